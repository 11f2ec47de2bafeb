"""clipguide: turn CLIP similarity into losses and gradients that steer image generators."""
