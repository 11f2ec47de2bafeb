"""Training loop: it learns, accumulation keeps the full batch, resume after SIGKILL is exact, bad input is loud."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

import core_clip
from core_clip.calibrate import record_match_score
from core_clip.errors import DataError, ImageReadError
from core_clip.train import Checkpoints, TrainConfig, Trainer, TrainError, train

ROOT = Path(__file__).resolve().parents[2]


def _cfg(tmp_path, **overrides) -> TrainConfig:
    base = dict(data="shapes", out=str(tmp_path / "run"), model="shapes-tiny", batch_size=16, samples_per_epoch=160,
                epochs=1, warmup_steps=2, lr=1e-3, save_every=1000, eval_every=0, eval_samples=32,
                progress=False, device="cpu")
    base.update(overrides)
    return TrainConfig(**base)


def _losses(out: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def test_training_lowers_the_loss_and_saves_a_loadable_model(tmp_path):
    cfg = _cfg(tmp_path, samples_per_epoch=320, epochs=2, lr=2e-3)
    model = train(cfg)
    losses = _losses(Path(cfg.out))
    assert len(losses) == 40
    first, last = sum(losses[s] for s in range(1, 6)) / 5, sum(losses[s] for s in range(36, 41)) / 5
    assert last < first - 0.3, (first, last)
    assert 0 <= model.clip.logit_scale.item() <= torch.log(torch.tensor(100.0)).item() + 1e-6
    loaded = core_clip.load(str(Path(cfg.out) / "model.safetensors"), device="cpu")
    assert torch.equal(loaded.encode_text(["a red circle"]), model.encode_text(["a red circle"]))
    evals = [json.loads(line) for line in (Path(cfg.out) / "metrics.jsonl").read_text().splitlines()
             if "eval" in line]
    assert [e["step"] for e in evals] == [20, 40] and "shape_acc" in evals[0]["eval"]


def _first_step_gradients(cfg: TrainConfig) -> tuple[float, dict[str, torch.Tensor]]:
    trainer = Trainer(cfg)
    grads = {}

    def capture(*args, **kwargs):  # stands in for AdamW.step: record the gradient, leave the weights
        grads.update({n: p.grad.clone() for n, p in trainer.model.clip.named_parameters() if p.grad is not None})

    trainer.optimizer.step = capture
    loss = trainer._train_step(next(trainer._batches(epoch=0, start_step=0)))
    return loss, grads


def test_feature_cache_accumulation_equals_one_big_batch(tmp_path):
    loss_one, one = _first_step_gradients(_cfg(tmp_path / "a", batch_size=16, accum_steps=1, augment=False))
    loss_two, two = _first_step_gradients(_cfg(tmp_path / "b", batch_size=8, accum_steps=2, augment=False))
    assert loss_one == pytest.approx(loss_two, abs=1e-6)
    assert one.keys() == two.keys() and "logit_scale" in one
    for name in one:  # fp32 sums in another order: compare each gradient tensor as a whole
        assert (one[name] - two[name]).norm() <= 1e-4 * one[name].norm(), name
    # the temperature's gradient is counted once, not once per micro-batch
    assert one["logit_scale"].item() == pytest.approx(two["logit_scale"].item(), rel=1e-4)


def _train_cmd(out: Path, steps: int) -> list[str]:
    return [sys.executable, "-m", "core_clip.train", "--data", "shapes", "--out", str(out), "--model", "shapes-tiny",
            "--batch-size", "16", "--samples-per-epoch", "96", "--epochs", "3", "--max-steps", str(steps),
            "--save-every", "4", "--warmup-steps", "2", "--no-progress", "--device", "cpu", "--eval-every", "0",
            "--eval-samples", "16", "--workers", "1"]


def test_resume_after_sigkill_reproduces_the_uninterrupted_run(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    straight = tmp_path / "straight"
    subprocess.run(_train_cmd(straight, 14), check=True, env=env, timeout=300, capture_output=True)

    killed = tmp_path / "killed"
    proc = subprocess.Popen(_train_cmd(killed, 14), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    latest = killed / "checkpoints" / "latest"
    deadline = time.monotonic() + 240
    while not (latest.is_file() and latest.read_text().strip() == "step_0000004") and time.monotonic() < deadline:
        assert proc.poll() is None, "training ended before it could be killed"
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)  # mid-epoch: an epoch is 6 steps, the checkpoint is at step 4
    proc.wait()
    assert 4 in _losses(killed)  # it logged step 4 before dying

    # every checkpoint folder that exists is complete and loadable
    for ckpt in (killed / "checkpoints").glob("step_*"):
        core_clip.load(str(ckpt / "model.safetensors"), device="cpu")
        assert torch.load(ckpt / "state.pt", weights_only=True)["step"] == int(ckpt.name.split("_")[1])

    subprocess.run(_train_cmd(killed, 14) + ["--resume"], check=True, env=env, timeout=300, capture_output=True)
    assert _losses(killed) == _losses(straight)  # bit-identical floats, every step once
    assert torch.equal(core_clip.load(str(killed / "model.safetensors")).encode_text(["a red circle"]),
                       core_clip.load(str(straight / "model.safetensors")).encode_text(["a red circle"]))


def _csv(tmp_path: Path, rows: list[str]) -> str:
    for name in ("a.png", "b.png", "c.png"):
        Image.new("RGB", (32, 32), (200, 30, 30)).save(tmp_path / name)
    path = tmp_path / "pairs.csv"
    path.write_text("\n".join(rows) + "\n")
    return str(path)


@pytest.mark.parametrize("rows, error, message", [
    (["a.png,a red square", "missing.png,x"], DataError, "missing.png"),
    (["a.png,a red square", "b.png,"], DataError, "empty caption"),
    (["a.png,a red square", "b.png,a red square", "c.png,a red square"], DataError, "larger than the dataset"),
])
def test_bad_training_data_fails_before_training(tmp_path, rows, error, message):
    with pytest.raises(error, match=message):
        train(_cfg(tmp_path, data=_csv(tmp_path, rows), batch_size=8))


def test_unreadable_image_stops_training_naming_the_file(tmp_path):
    data = _csv(tmp_path, ["a.png,a red square", "bad.png,a broken file"])
    (tmp_path / "bad.png").write_bytes(b"not a png")
    with pytest.raises(ImageReadError, match="bad.png"):
        train(_cfg(tmp_path, data=data, batch_size=2))


def test_resume_guards(tmp_path):
    with pytest.raises(TrainError, match="no checkpoint"):
        train(_cfg(tmp_path, resume=True))
    train(_cfg(tmp_path, max_steps=2, save_every=1))
    with pytest.raises(TrainError, match="already holds checkpoints"):
        train(_cfg(tmp_path, max_steps=2))
    with pytest.raises(TrainError, match="differ from the saved run: batch_size"):
        train(_cfg(tmp_path, max_steps=4, resume=True, batch_size=8))
    with pytest.raises(TrainError, match="differ from the saved run: noise"):
        train(_cfg(tmp_path, max_steps=4, resume=True, noise=0.3))
    with pytest.raises(TrainError, match="--lr must be > 0"):
        train(_cfg(tmp_path, lr=0))
    for name in ("weight_decay", "grad_clip", "noise", "adv_eps"):   # NaN is never in range (it compares False to 0)
        with pytest.raises(TrainError, match=f"--{name.replace('_', '-')} must be >= 0, got nan"):
            train(_cfg(tmp_path, **{name: float("nan")}))
    with pytest.raises(TrainError, match="--adv-norm must be linf or l2, got 'l1'"):
        train(_cfg(tmp_path, adv_eps=1.0, adv_norm="l1"))
    with pytest.raises(TrainError, match="--precision must be one of fp32, fp16, bf16, got 'fp8'"):
        train(_cfg(tmp_path, precision="fp8"))


def test_noise_sets_the_training_pictures_pixel_noise(tmp_path):
    def roughness(noise: float) -> float:
        """Mean absolute difference of horizontal neighbours over 8 training pictures (flat but for one edge)."""
        dataset = Trainer(_cfg(tmp_path / str(noise), noise=noise)).dataset
        return sum((dataset[i].image.diff(dim=-1).abs().mean() for i in range(8)), 0.0).item() / 8

    quiet, default, loud = roughness(0.0), roughness(0.02), roughness(0.5)
    assert quiet < 0.02 and default > quiet
    assert loud > 5 * default


def test_resume_of_a_run_saved_before_a_setting_existed_takes_its_default(tmp_path):
    train(_cfg(tmp_path, max_steps=2, save_every=1))
    checkpoint = Checkpoints(tmp_path / "run", keep=2).latest()
    state = Checkpoints.read_state(checkpoint)
    del state["config"]["adv_norm"]  # as written before --adv-norm was added
    torch.save(state, checkpoint / "state.pt")
    train(_cfg(tmp_path, max_steps=3, resume=True))
    with pytest.raises(TrainError, match="differ from the saved run: adv_norm"):
        train(_cfg(tmp_path, max_steps=4, resume=True, adv_norm="l2"))


def test_cli_train_json(tmp_path, capsys):
    from core_clip.cli import main

    out = tmp_path / "digits"
    assert main(["train", "--data", "digits", "--out", str(out), "--batch-size", "32", "--max-steps", "2",
                 "--device", "cpu", "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["out"] == str(out / "model.safetensors")
    core_clip.load(result["out"], device="cpu")


@pytest.mark.parametrize("norm, eps", [("linf", 0.03), ("l2", 2.0)])
def test_adversarial_images_stay_in_the_ball_raise_the_loss_and_are_reproducible(tmp_path, norm, eps):
    from core_clip.loss import ClipLoss

    trainer = Trainer(_cfg(tmp_path, adv_eps=eps, adv_norm=norm, adv_steps=2, augment=False))
    batch = next(trainer._batches(epoch=0, start_step=0))[0]
    attacked = trainer._adversarial(batch, 0)
    delta = attacked.images - batch.images
    size = delta.abs().amax(dim=(1, 2, 3)) if norm == "linf" else delta.flatten(1).norm(dim=1)
    assert size.max() <= eps * (1 + 1e-5) and size.min() > 0.6 * eps  # clamping to [0, 1] only shrinks delta
    assert attacked.images.min() >= 0 and attacked.images.max() <= 1
    assert torch.equal(trainer._adversarial(batch, 0).images, attacked.images)
    assert not torch.equal(trainer._adversarial(batch, 1).images, attacked.images)

    def loss(images):
        with torch.no_grad():
            model = trainer.model
            img = model.clip.encode_image(model.preprocess.normalize(images))
            txt = model.clip.encode_text(model.tokenizer(batch.captions))
            img, txt = torch.nn.functional.normalize(img, dim=-1), torch.nn.functional.normalize(txt, dim=-1)
            return ClipLoss()(img, txt, model.logit_scale)["contrastive_loss"].item()

    assert loss(attacked.images) > loss(batch.images)


def test_fine_tuning_a_saved_model_with_a_locked_image_tower(tmp_path, tiny_model):
    start = tiny_model.save(tmp_path / "start.safetensors")
    record_match_score(str(start), 70.0)
    tuned = train(_cfg(tmp_path, model=str(start), lock_image=True, max_steps=2))
    # the start's calibration does not carry over to the new weights
    assert core_clip.load(str(start)).match_score == 70.0 and tuned.match_score is None
    assert core_clip.load(str(tmp_path / "run" / "model.safetensors")).match_score is None
    before = core_clip.load(str(start), device="cpu").clip.state_dict()
    after = tuned.clip.state_dict()
    visual = [k for k in before if k.startswith("visual.")]
    assert visual and all(torch.equal(before[k], after[k]) for k in visual)
    assert not torch.equal(before["token_embedding.weight"], after["token_embedding.weight"])


def test_torchrun_two_processes_match_one_process_on_the_global_batch(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    flags = ["--data", "shapes", "--model", "shapes-tiny", "--samples-per-epoch", "64", "--max-steps", "2",
             "--warmup-steps", "1", "--no-progress", "--device", "cpu", "--eval-every", "0", "--eval-samples", "16"]
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                    "-m", "core_clip.train", "--out", str(tmp_path / "two"), "--batch-size", "8", *flags],
                   check=True, env=env, timeout=300, capture_output=True)
    subprocess.run([sys.executable, "-m", "core_clip.train", "--out", str(tmp_path / "one"), "--batch-size", "16",
                    *flags], check=True, env=env, timeout=300, capture_output=True)
    two, one = _losses(tmp_path / "two"), _losses(tmp_path / "one")
    assert two.keys() == one.keys() == {1, 2}
    assert two[1] == pytest.approx(one[1], abs=1e-5)  # the same 16 samples, gathered across ranks
    assert two[2] == pytest.approx(one[2], abs=1e-3)  # after one AdamW update from DDP-averaged gradients


def test_gradient_checkpointing_keeps_the_gradients_and_bf16_trains(tmp_path):
    _, plain = _first_step_gradients(_cfg(tmp_path / "a", augment=False))
    _, checkpointed = _first_step_gradients(_cfg(tmp_path / "b", augment=False, grad_checkpointing=True))
    for name in plain:
        assert (plain[name] - checkpointed[name]).norm() <= 1e-5 * plain[name].norm() + 1e-8, name
    loss, grads = _first_step_gradients(_cfg(tmp_path / "c", augment=False, precision="bf16"))
    assert 0 < loss < 10 and all(torch.isfinite(g).all() for g in grads.values())


def test_image_activation_fine_tunes_a_smooth_tower_and_saves_it(tmp_path):
    model = train(_cfg(tmp_path, model="shapes-rn", image_activation="silu", max_steps=2, save_every=1))
    assert not any(isinstance(m, torch.nn.ReLU) for m in model.clip.visual.modules())
    saved = core_clip.load(str(tmp_path / "run" / "model.safetensors"), device="cpu")
    assert saved.config.image_activation == "silu"
    images = torch.rand(2, 3, 64, 64)
    assert torch.equal(saved.embed_images(images), model.embed_images(images))
    train(_cfg(tmp_path, model="shapes-rn", image_activation="silu", max_steps=3, save_every=1, resume=True))
    with pytest.raises(TrainError, match="differ from the saved run: image_activation"):
        train(_cfg(tmp_path, model="shapes-rn", max_steps=4, resume=True))
    with pytest.raises(TrainError, match="--image-activation must be one of gelu, silu, got 'tanh'"):
        train(_cfg(tmp_path / "bad", model="shapes-rn", image_activation="tanh"))
