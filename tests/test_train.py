"""The train step and the trainer: learning really happens, the EMA follows the student, the NaN
guard skips bad steps, sharded meshes compute what one device computes, and a resumed run is
bitwise identical to an uninterrupted one."""

from __future__ import annotations

import functools
import json
import re

import jax
import numpy as np
import pytest

from dinov3_jax import parallel
from dinov3_jax.configs import ConfigError, load_config
from dinov3_jax.data.pipeline import build_train_pipeline
from dinov3_jax.data.sources import make_source
from dinov3_jax.train.main import SCHEDULE_KEYS, TrainingDiverged, device_batch, saved_part, setup, train

# A very small run: 16 px global crops of 2×2 patches, 8 px local crops, 16 images a step. The
# values the tests rely on are pinned here, so tuning the tiny_cpu recipe cannot change them.
MICRO = [
    "student.arch=vit_tiny",
    "student.layerscale=1e-5",
    "optim.lr=0.002",  # sqrt_wrt_1024 at batch 16: × 0.5 → peak 1e-3
    "optim.scaling_rule=sqrt_wrt_1024",
    "teacher.momentum_teacher=0.99",
    "teacher.warmup_teacher_temp=0.04",
    "teacher.teacher_temp=0.07",
    "student.patch_size=8",
    "student.drop_path_rate=0.2",
    "crops.global_crops_size=16",
    "crops.local_crops_size=8",
    "crops.local_crops_number=2",
    "dino.head_n_prototypes=64",
    "dino.head_bottleneck_dim=16",
    "dino.head_hidden_dim=32",
    "ibot.head_n_prototypes=64",
    "ibot.head_bottleneck_dim=16",
    "ibot.head_hidden_dim=32",
    "train.batch_size_per_gpu=2",
    "train.OFFICIAL_EPOCH_LENGTH=2",
    "optim.epochs=3",
    "optim.warmup_epochs=1",
    "optim.freeze_last_layer_epochs=1",
    "teacher.warmup_teacher_temp_epochs=1",
    "data.source=synthetic",
    "data.synthetic_image_size=32",
    "data.num_samples=64",
    "data.num_workers=0",
    "runtime.knn_every_steps=null",
    "runtime.log_every_steps=1",
]
BATCH = 16  # 2 per device × 8 simulated devices


@functools.cache
def micro_config(*extra: str):
    return load_config("tiny_cpu", [*MICRO, *extra])


@functools.cache
def host_batches(n: int = 4):
    cfg = micro_config()
    source = make_source("synthetic", None, split="train", num_samples=64, image_size=32, seed=0)
    it = iter(build_train_pipeline(source, cfg=cfg, per_host_batch=BATCH))
    return [next(it) for _ in range(n)]


def run_steps(
    mesh,
    n_steps: int = 2,
    *,
    loss_groups: int = 8,
    mutate=None,
    extra: tuple[str, ...] = (),
    first: int = 0,
    restore=None,
    save=None,
):
    """n steps on `mesh` from step `first` (`restore(like_state)` gives that step's state, `save`
    takes the last one as it lies on the devices); returns (states after each step as host numpy
    trees, metrics)."""
    cfg = micro_config(*extra)
    run = setup(cfg, mesh, global_batch=BATCH, steps=6, loss_groups=loss_groups)
    state = run.state if restore is None else restore(run.state)
    states, metrics = [jax.device_get(state)], []
    for step, host in enumerate(host_batches()[first : first + n_steps], start=first):
        host = dict(host) if mutate is None else mutate(dict(host))
        # With the trainer's stop flags (none asked unless `mutate` sets some): the trainer's program.
        asked = host.pop("stop", None)
        batch = device_batch(host, mesh, n_micro=cfg.train.grad_accumulation_steps)
        if asked is not None:
            rows = {"stop": asked.reshape(batch["stop"].shape)}
            batch["stop"] = parallel.host_to_global(rows, mesh, ("stop",), batch_axis=1)["stop"]
        sched = {k: np.float32(v) for k, v in run.schedules.at(step).items() if k in SCHEDULE_KEYS}
        state, m = run.step_fn(state, batch, sched)
        states.append(jax.device_get(state))
        metrics.append(jax.device_get(m) | {"sched": sched})
    if save is not None:
        save(state)
    return states, metrics


def one_device_mesh():
    return parallel.make_mesh(1, 1, devices=jax.devices()[:1])


# KoLeo's gradient at initialisation is ill-conditioned: the CLS features of a fresh model are
# nearly identical, so x_i − x_nn cancels catastrophically and 1/d amplifies any rounding (0.7%
# gradient differences between meshes with it, 1.2e-6 without). Parameters are compared without it;
# its loss value is compared all the same. The one-device tests share this config (one program to
# compile); the trainer's tests train with KoLeo.
NO_KOLEO = ("dino.koleo_loss_weight=0",)


@functools.cache
def single_device_run():
    return run_steps(one_device_mesh(), n_steps=3, extra=NO_KOLEO)


def leaves(tree):
    return jax.tree.leaves(tree)


def test_two_steps_learn_and_the_teacher_follows():
    states, metrics = single_device_run()
    for m in metrics:
        assert np.isfinite(m["loss"]) and m["finite"]
    # The v1 warm-up starts at lr 0 (RECIPE.md §5.4), so the first step cannot move the student...
    assert metrics[0]["sched"]["lr"] == 0
    for a, b in zip(leaves(states[0]["student"]), leaves(states[1]["student"])):
        np.testing.assert_array_equal(a, b)
    # ... the second one does.
    assert metrics[1]["sched"]["lr"] > 0
    before, after = states[1], states[2]
    assert any(not np.array_equal(a, b) for a, b in zip(leaves(before["student"]), leaves(after["student"])))
    # teacher_new = m·teacher_old + (1 − m)·student_new, for every parameter.
    m = metrics[1]["sched"]["momentum"]
    assert 0 < m < 1
    for t_old, t_new, s_new in zip(leaves(before["teacher"]), leaves(after["teacher"]), leaves(after["student"])):
        np.testing.assert_allclose(t_new, m * t_old + (1 - m) * s_new, rtol=1e-6, atol=1e-7)
    assert int(after["step"]) == 2


def test_last_layer_frozen_then_trained():
    states, metrics = single_device_run()
    assert metrics[0]["sched"]["last_layer_lr"] == 0 and metrics[1]["sched"]["last_layer_lr"] == 0
    assert metrics[2]["sched"]["last_layer_lr"] > 0
    for head in ("dino_head", "ibot_head"):
        w = [s["student"][head]["last_layer"]["kernel"] for s in states]
        np.testing.assert_array_equal(w[0], w[1])
        np.testing.assert_array_equal(w[1], w[2])
        assert not np.array_equal(w[2], w[3])
        # Meanwhile the rest of the head trains (from the first step with a non-zero lr).
        assert not np.array_equal(
            states[1]["student"][head]["mlp"][0]["kernel"], states[2]["student"][head]["mlp"][0]["kernel"]
        )


def test_softmax_centring_keeps_an_ema_of_the_teacher_logits():
    """train.centering=softmax (DINO v1, a project key): the DINO centre after one step is
    m·0 + (1 − m)·the batch mean of the teacher's CLS logits (the iBOT one likewise over the
    masked patches), with m = train.center_momentum; Sinkhorn-Knopp leaves the centres at 0."""
    from flax import nnx

    from dinov3_jax.train.step import teacher_logits

    extra = (*NO_KOLEO, "train.centering=softmax", "train.center_momentum=0.25")
    states, metrics = run_steps(one_device_mesh(), n_steps=1, extra=extra)
    assert np.isfinite(metrics[0]["loss"])
    run = setup(micro_config(*extra), one_device_mesh(), global_batch=BATCH, steps=6)
    teacher = nnx.merge(next(iter(run.students.values())).teacher_def, nnx.State(states[0]["teacher"]))
    micro = {k: v[0] for k, v in device_batch(dict(host_batches()[0]), one_device_mesh(), n_micro=1).items()}
    cls_logits, patch_logits, _ = (np.asarray(x) for x in teacher_logits(teacher, micro))
    valid = np.asarray(micro["mask_weights"]).reshape(-1) > 0
    np.testing.assert_allclose(states[1]["centers"]["dino"][0], 0.75 * cls_logits.mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(
        states[1]["centers"]["ibot"][0], 0.75 * patch_logits[valid].mean(0), rtol=1e-5, atol=1e-6
    )
    assert np.abs(states[1]["centers"]["dino"]).max() > 0
    sinkhorn_states, _ = single_device_run()
    assert not np.any(sinkhorn_states[-1]["centers"]["dino"]) and not np.any(sinkhorn_states[-1]["centers"]["ibot"])


def test_nan_step_is_skipped_and_counted():
    def poison(host):
        host["global_crops"] = host["global_crops"].copy()
        host["global_crops"][0, 0, 0, 0] = np.nan
        return host

    states, metrics = run_steps(one_device_mesh(), n_steps=1, mutate=poison, extra=NO_KOLEO)
    assert not metrics[0]["finite"]
    before, after = states
    for key in ("student", "teacher", "opt_state"):
        for a, b in zip(leaves(before[key]), leaves(after[key])):
            np.testing.assert_array_equal(a, b)
    assert (int(after["nan_streak"]), int(after["nan_total"]), int(after["step"])) == (1, 1, 1)


@pytest.mark.slow
@pytest.mark.parametrize(("data", "fsdp"), [(8, 1), (2, 4)])
def test_sharded_meshes_match_one_device(data, fsdp):
    """Data parallel and FSDP give the losses and the parameters of one device.

    Tolerances (fp32, different summation order of the sharded reductions): losses rtol 2e-5;
    parameters after two steps within 1e-6 absolute, 0.1% of one Adam step (lr = 1e-3)."""
    ref_states, ref_metrics = single_device_run()
    states, metrics = run_steps(parallel.make_mesh(data, fsdp), n_steps=2, extra=NO_KOLEO)
    for m, r in zip(metrics, ref_metrics):
        for k in ("loss", "dino_local", "dino_global", "ibot", "koleo"):
            np.testing.assert_allclose(m[k], r[k], rtol=2e-5, err_msg=k)
    assert metrics[1]["sched"]["lr"] == pytest.approx(1e-3)
    for key in ("student", "teacher"):
        for a, b in zip(leaves(states[2][key]), leaves(ref_states[2][key])):
            np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)


# Accumulated and large-batch steps draw drop path differently (one permutation per micro-batch).
NO_DROP_PATH = ("student.drop_path_rate=0",)


@functools.cache
def reference_run():
    """Four steps on one device, without drop path and KoLeo's gradient."""
    return run_steps(one_device_mesh(), n_steps=4, extra=NO_KOLEO + NO_DROP_PATH)


@pytest.mark.slow
def test_gradient_accumulation_equals_the_large_batch_step():
    """train.grad_accumulation_steps=2 (two micro-batches of 8) gives the losses and parameters of
    one step on the batch of 16, on one device and on 8 devices with FSDP: the teacher runs on both
    micro-batches first and the Sinkhorn-Knopp targets of DINO and iBOT are computed over all 16
    images (centred per micro-batch they would differ, which naive accumulation does), the
    gradients of the micro-batches are averaged, then one AdamW and one EMA update. KoLeo's groups
    are the large batch's (2 consecutive samples: 8 groups, 4 per micro-batch).

    Tolerances (fp32, other summation orders): losses rtol 2e-5 (KoLeo 5e-5: the −log of the
    distances between the nearly equal features of a fresh model amplifies rounding; measured
    2.2e-5 with FSDP); parameters after two steps (one with lr > 0) within 1e-6 absolute, 0.1% of
    one Adam step (lr = 1e-3)."""
    ref_states, ref_metrics = reference_run()
    accumulate = (*NO_KOLEO, *NO_DROP_PATH, "train.grad_accumulation_steps=2")
    for mesh, groups in ((one_device_mesh(), 4), (parallel.make_mesh(2, 4), 4)):
        states, metrics = run_steps(mesh, n_steps=2, loss_groups=groups, extra=accumulate)
        for m, r in zip(metrics, ref_metrics):
            for k in ("loss", "dino_local", "dino_global", "ibot", "koleo"):
                rtol = 5e-5 if k == "koleo" else 2e-5  # −log of nearly equal features' distances
                np.testing.assert_allclose(m[k], r[k], rtol=rtol, err_msg=f"{k} on {mesh.shape}")
        assert metrics[1]["sched"]["lr"] == pytest.approx(1e-3)
        for key in ("student", "teacher"):
            for a, b in zip(leaves(states[2][key]), leaves(ref_states[2][key])):
                np.testing.assert_allclose(a, b, rtol=0, atol=1e-6, err_msg=f"{key} on {mesh.shape}")


@pytest.mark.slow
def test_elastic_restore_onto_other_meshes(tmp_path):
    """A checkpoint written on one mesh restores onto another and the run goes on as it would have:
    2 steps with FSDP over 4 of 8 devices (mesh 2×4), then on 4 devices with FSDP over 2 (2×2) and
    two micro-batches (the same global batch of 16), then data-parallel on 8 (8×1). The restored
    state equals the saved one, lies on the new mesh, and every step's losses and parameters are
    those of the one-device run (the losses' tolerances of the accumulation test; the parameters'
    grow with the steps taken, 1.5e-6 for each Adam step, 0.15% of one step at lr 1e-3: measured
    1.6e-6 after the second Adam step on an Intel Xeon, 2.1e-6 on an AMD EPYC)."""
    from dinov3_jax.checkpoint import Checkpointer

    ref_states, ref_metrics = reference_run()
    ckpt = Checkpointer(tmp_path / "checkpoints", async_save=False)
    legs = [  # (mesh, micro-batches, first step, steps)
        (parallel.make_mesh(2, 4), 1, 0, 2),
        (parallel.make_mesh(2, 2, devices=jax.devices()[:4]), 2, 2, 1),
        (parallel.make_mesh(8, 1), 1, 3, 1),
    ]
    saved = None
    for mesh, n_micro, first, n_steps in legs:
        restore = None
        if saved is not None:

            def restore(like, step=first, mesh=mesh):
                state = ckpt.restore(step, saved_part(like))
                qkv = lambda s: s["student"]["backbone"]["blocks"][0]["attn"]["qkv"]["kernel"]  # noqa: E731
                assert qkv(state).sharding.mesh == mesh and qkv(state).sharding == qkv(like).sharding
                return {**like, **state}

        extra = (*NO_KOLEO, *NO_DROP_PATH, f"train.grad_accumulation_steps={n_micro}")
        last = first + n_steps
        states, metrics = run_steps(
            mesh,
            n_steps,
            loss_groups=8 // n_micro,
            extra=extra,
            first=first,
            restore=restore,
            save=lambda state, step=last: ckpt.save(step, saved_part(state), {"run": {}}),
        )
        if saved is not None:
            for a, b in zip(leaves(states[0]), leaves(saved)):
                np.testing.assert_array_equal(a, b)
        for i, (m, r) in enumerate(zip(metrics, ref_metrics[first:])):
            for k in ("loss", "dino_local", "dino_global", "ibot", "koleo"):
                np.testing.assert_allclose(
                    m[k], r[k], rtol=5e-5 if k == "koleo" else 2e-5, err_msg=f"{k}, step {first + i}"
                )
        for key in ("student", "teacher"):
            for a, b in zip(leaves(states[-1][key]), leaves(ref_states[last][key])):
                # Rounding differences compound: 1.5e-6 for each Adam step taken with lr > 0 (steps 1, 2, ...).
                np.testing.assert_allclose(a, b, rtol=0, atol=1.5e-6 * (last - 1), err_msg=f"{key} after step {last}")
        saved = states[-1]
    ckpt.close()


def test_fsdp_shards_the_parameters():
    cfg = micro_config()
    run = setup(cfg, parallel.make_mesh(2, 4), global_batch=BATCH, steps=6)
    qkv = run.state["student"]["backbone"]["blocks"][0]["attn"]["qkv"]["kernel"]
    assert qkv.sharding.spec == jax.sharding.PartitionSpec("fsdp", None)
    assert qkv.addressable_shards[0].data.shape == (16, 192)
    mu = run.state["opt_state"]
    assert any(getattr(x, "sharding", None) == qkv.sharding for x in jax.tree.leaves(mu))


@pytest.mark.slow
def test_the_trainer_resumes_on_another_layout_of_the_same_global_batch(tmp_path, capsys):
    """`train` resumes a run written on the 8×1 mesh (4 images per device) on a 2×4 FSDP mesh with
    2 images per device in each of 2 micro-batches, and says so; another global batch is refused."""
    out = f"train.output_dir={tmp_path / 'run'}"
    train(micro_config(out, "runtime.max_steps=2", "train.batch_size_per_gpu=4"), progress=False)
    other_layout = ("mesh.fsdp=4", "train.batch_size_per_gpu=2", "train.grad_accumulation_steps=2")
    with pytest.raises(ConfigError, match=r"run\.global_batch: 32 → 16"):
        train(micro_config(out, "runtime.max_steps=3", *other_layout[:2]), progress=False)
    result = train(micro_config(out, "runtime.max_steps=3", *other_layout), progress=False)
    assert result["steps"] == 3 and np.isfinite(result["loss"])
    said = capsys.readouterr().out
    assert "resuming checkpoint 2 on another device layout, with the same global batch of 32 images" in said
    assert "train.grad_accumulation_steps: 1 → 2" in said and "resumed from" in said


@pytest.mark.slow
def test_exact_resume_after_a_signal_a_damaged_checkpoint_and_harmless_changes(tmp_path, monkeypatch, capsys):
    """N steps in one go equal, bitwise on CPU, a run stopped by SIGTERM (a checkpoint at the step
    it reached, exit code 128 + 15) and resumed with other data workers and logging. Resuming with
    another seed is refused, naming the key; a truncated newest checkpoint is set aside with a
    warning and the one before restored."""
    import os
    import shutil
    import signal

    from dinov3_jax.cli import main as cli
    from dinov3_jax.utils.metrics import MetricsWriter

    # nan_max_consecutive=0 tolerates no non-finite step, and stops no healthy run (it stopped at step 1 once).
    overrides = ["checkpointing.period=2", "runtime.nan_max_consecutive=0"]
    straight = train(micro_config(*overrides, f"train.output_dir={tmp_path / 'a'}"), progress=False)

    write = MetricsWriter.write

    def write_then_terminate(self, step, values):
        write(self, step, values)
        if step == 3:
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(MetricsWriter, "write", write_then_terminate)
    run_b = ["train", "tiny_cpu", *MICRO, *overrides, f"train.output_dir={tmp_path / 'b'}"]
    handler = signal.getsignal(signal.SIGTERM)
    assert cli(run_b) == 128 + signal.SIGTERM
    monkeypatch.undo()
    assert signal.getsignal(signal.SIGTERM) is handler  # ours is gone again
    checkpoints = lambda run: sorted(int(p.name) for p in (tmp_path / run / "checkpoints").iterdir())  # noqa: E731
    # The periodic one at 4 (2 is gone: max_to_keep=2); the signal arrived during step 3, step 4
    # carried it to every process (one step late, so that the device never waits), and step 5 was saved.
    assert checkpoints("b") == [4, 5]

    config_before = (tmp_path / "b" / "config.yaml").read_text()
    with pytest.raises(ConfigError, match=r"(?s)train\.seed: 0 → 1.*runtime\.resume_allow_changes=\[train\.seed\]"):
        train(micro_config(*overrides, "train.seed=1", f"train.output_dir={tmp_path / 'b'}"), progress=False)
    assert (tmp_path / "b" / "config.yaml").read_text() == config_before  # refused before writing

    shutil.copytree(tmp_path / "b", tmp_path / "c")
    files = [p for p in (tmp_path / "c" / "checkpoints" / "5").rglob("*") if p.is_file()]
    largest = max(files, key=lambda p: p.stat().st_size)
    largest.write_bytes(largest.read_bytes()[: largest.stat().st_size // 2])
    capsys.readouterr()
    harmless = ["data.num_workers=1", "runtime.log_every_steps=2"]
    resumed = train(micro_config(*overrides, *harmless, f"train.output_dir={tmp_path / 'b'}"), progress=False)
    assert resumed["steps"] == straight["steps"] == 6
    for key in ("student", "teacher", "opt_state"):
        a, b = jax.device_get(straight["state"][key]), jax.device_get(resumed["state"][key])
        for x, y in zip(leaves(a), leaves(b)):
            np.testing.assert_array_equal(x, y, err_msg=key)
    assert "resumed from" in capsys.readouterr().out
    # The copy's newest checkpoint is truncated: set aside with a warning, the one before restored
    # (the same restore as the resume above, from step 4).
    from dinov3_jax.checkpoint import Checkpointer

    ckpt = Checkpointer(tmp_path / "c" / "checkpoints")
    step, state = ckpt.restore_newest_intact(saved_part(resumed["state"]), tmp_path / "c" / "damaged_checkpoints")
    ckpt.close()
    assert step == 4 and int(state["step"]) == 4
    assert "checkpoint 5 is damaged" in capsys.readouterr().out
    assert (tmp_path / "c" / "damaged_checkpoints" / "5").is_dir()  # set aside, not deleted
    assert (tmp_path / "b" / "teacher_backbone.safetensors").exists()
    assert (tmp_path / "b" / "metrics.jsonl").read_text().count("\n") >= 6


def test_divergence_stops_with_a_clear_message(tmp_path):
    """More than `nan_max_consecutive` non-finite steps in a row stop the run at once (one step
    late at most), not at the next log step (every 100 here)."""
    cfg = micro_config(
        "optim.lr=1e30", "runtime.nan_max_consecutive=1", "runtime.log_every_steps=100", f"train.output_dir={tmp_path}"
    )
    with pytest.raises(TrainingDiverged, match="2 consecutive steps up to step") as err:
        train(cfg, progress=False)
    stopped_at = int(re.search(r"up to step (\d+)", str(err.value))[1])
    assert stopped_at < 6, err.value  # the run has 6 steps: it did not wait for the end (or step 100)


def test_bad_mesh_is_an_error_before_compiling(tmp_path):
    cfg = micro_config("mesh.data=3", f"train.output_dir={tmp_path}")
    with pytest.raises(ConfigError, match="mesh"):
        train(cfg, progress=False)


def test_unusable_paths_are_one_line_errors(tmp_path, capsys):
    """A binary config file, an output folder that is a file or cannot be written (a read-only
    place even for root): one line naming the path, exit code 2, no traceback."""
    from dinov3_jax.cli import main as cli

    binary = tmp_path / "recipe.yaml"
    binary.write_bytes(bytes(range(256)))
    (tmp_path / "a_file").write_text("")
    for args, message in (
        ([str(binary)], f"config file {binary} is not a text (YAML) file"),
        (["tiny_cpu", f"train.output_dir={tmp_path / 'a_file'}"], f"train.output_dir {tmp_path / 'a_file'} is a file"),
        (
            ["tiny_cpu", "train.output_dir=/sys/dinov3_jax_run"],
            "train.output_dir /sys/dinov3_jax_run cannot be written",
        ),
    ):
        assert cli(["train", *args]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err


def test_cli_trains_on_a_folder_of_images_and_exports(tmp_path, capsys):
    from PIL import Image

    from dinov3_jax import load_backbone, save_backbone
    from dinov3_jax.cli import main as cli

    rng = np.random.default_rng(0)
    for i in range(20):
        sub = tmp_path / "photos" / ("a" if i % 2 else "b")
        sub.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (40 + i, 48, 3), dtype=np.uint8)).save(sub / f"{i}.png")
    (tmp_path / "photos" / "a" / "broken.jpg").write_bytes(b"not an image")
    out = tmp_path / "run"
    args = [*MICRO, "data.source=folder", f"data.path={tmp_path / 'photos'}", "data.num_samples=null"]
    assert (
        cli(["train", "tiny_cpu", *args, "runtime.knn_every_steps=0", "optim.epochs=1", f"train.output_dir={out}"]) == 0
    )
    printed = capsys.readouterr().out
    assert "k-NN evaluation skipped" in printed and "trained 2 steps" in printed
    broken = tmp_path / "photos" / "a" / "broken.jpg"
    assert f"skipping unreadable image {broken}" in printed  # named, in the log and in the run folder
    assert (out / "unreadable_images.txt").read_text().startswith(f"{broken}\t")
    assert (out / "config.yaml").exists() and (out / "result.json").exists()
    backbone = load_backbone(weights=out / "teacher_backbone.safetensors")
    assert backbone.config.patch_size == 8 and backbone.config.embed_dim == 64
    save_backbone(backbone, tmp_path / "official.pth", "meta")
    save_backbone(backbone, tmp_path / "hf", "hf")
    assert load_backbone(weights=tmp_path / "official.pth").config.depth == backbone.config.depth


@pytest.mark.slow
def test_bf16_compute_step_is_finite():
    states, metrics = run_steps(one_device_mesh(), n_steps=2, extra=("compute_precision.param_dtype=bf16",))
    assert all(m["finite"] and np.isfinite(m["loss"]) for m in metrics)
    qkv = states[-1]["student"]["backbone"]["blocks"][0]["attn"]["qkv"]["kernel"]
    assert qkv.dtype == np.float32  # parameters stay fp32


def test_global_crops_only(tmp_path):
    """crops.local_crops_number=0 (no local crops) trains on the global crops alone: finite losses,
    no local DINO term."""
    cfg = micro_config("crops.local_crops_number=0", "runtime.max_steps=2", f"train.output_dir={tmp_path}")
    result = train(cfg, progress=False)
    assert result["skipped_steps"] == 0 and np.isfinite(result["loss"])
    logged = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert all(m["dino_local"] == 0.0 and m["dino_global"] > 0 for m in logged if "dino_local" in m)


def test_one_run_per_output_folder(tmp_path):
    """A second run on a folder in use stops at once naming the holder; a holder killed with
    SIGKILL leaves no lock behind (the OS releases it)."""
    import os
    import subprocess
    import sys

    from dinov3_jax.utils.files import FolderInUse, folder_lock

    with folder_lock(tmp_path), pytest.raises(FolderInUse, match=f"in use by another run \\(pid {os.getpid()} on "):
        train(micro_config(f"train.output_dir={tmp_path}"), progress=False)
    assert not (tmp_path / "config.yaml").exists()  # refused before writing anything
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom dinov3_jax.utils.files import folder_lock\n"
         f"with folder_lock({str(tmp_path)!r}):\n    print('locked', flush=True)\n    time.sleep(120)"],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(FolderInUse, match=f"pid {holder.pid} on "), folder_lock(tmp_path):
            pass
    finally:
        holder.kill()
        holder.wait()
    with folder_lock(tmp_path):  # free again
        pass


def test_checkpoints_keep_the_last_n_and_every_keep_every(tmp_path):
    """checkpointing.keep_every (official: 50000) keeps multiples of it beyond max_to_keep."""
    from dinov3_jax.checkpoint import Checkpointer

    ckpt = Checkpointer(tmp_path, max_to_keep=2, keep_every=3, async_save=False)
    for step in range(1, 8):
        ckpt.save(step, {"x": jax.numpy.full((2,), float(step))}, {"config": ""})
    assert ckpt.steps() == [7, 6, 3]
    np.testing.assert_array_equal(ckpt.restore(3, {"x": jax.numpy.zeros(2)})["x"], [3.0, 3.0])
    ckpt.close()


def test_the_first_signal_asks_to_stop_and_a_second_quits():
    import os
    import signal

    from dinov3_jax.utils.signals import stop_on_signals

    before = signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal (xdist workers differ)
    try:
        with pytest.raises(KeyboardInterrupt), stop_on_signals() as stop:
            os.kill(os.getpid(), signal.SIGINT)
            assert stop.name == "SIGINT"  # recorded; the run goes on to the end of its step
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C again: out at once
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, before)


def test_a_stop_asked_on_one_process_is_seen_by_all():
    """The stop flag rides in the global batch and the step returns whether any row asked: the
    rows of one device (as one process of a multi-host run would feed) stop every process at the
    same step."""

    def ask_on_the_last_device(host):
        asked = np.zeros(BATCH, bool)
        asked[-2:] = True  # the last device's two samples
        return host | {"stop": asked}

    _, metrics = run_steps(parallel.make_mesh(8, 1), n_steps=1, mutate=ask_on_the_last_device)
    assert bool(metrics[0]["stop"])
    _, metrics = run_steps(parallel.make_mesh(8, 1), n_steps=1)
    assert not bool(metrics[0]["stop"])
