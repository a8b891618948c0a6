"""Forward-pass throughput: dinov3-jax vs Hugging Face transformers (`DINOv3ViTModel`,
`DINOv3ConvNextModel`), same weights.

For each case the script builds our backbone with random weights, loads the very same weights into
the transformers model, checks that both give the same normalised tokens on one random
batch, then times the two side by side in this process: compile / warm up first, then alternate
one call of ours and one call of torch, and report the median of each.

    .venv/bin/python benchmarks/bench_forward.py                       # CPU, fp32, all cases
    .venv/bin/python benchmarks/bench_forward.py --cases s16-224 --repeats 9
    .venv/bin/python benchmarks/bench_forward.py --dtype bf16 --attention cudnn   # on a GPU
    .venv/bin/python benchmarks/bench_forward.py --backward --cases s16-224 b16-224 --batch 16

`--backward` times forward + backward instead (ViT cases): ours is one jitted
`jax.value_and_grad` of the loss mean(tokens²) over all normed output tokens ([CLS, registers,
patches], = transformers' `last_hidden_state`) with respect to every parameter; torch runs the
same forward, the same loss and `loss.backward()` (gradients set to None before each call). Every
parameter's gradient is compared (ours mapped to the transformers names by the weight
converter) with torch's in fp32 and with a float64 copy of the torch model: per tensor
max |Δ| / max |fp64 gradient|; ours pass when their worst error against fp64 is at most
max(2 × torch fp32's worst, `--grad-rtol`) (fp32 gradients of these deep random-weight models
are only good to a few 1e-3, torch's as well as ours).

On a GPU, bf16 means our model computes in bf16 (parameters stay fp32, norms / softmax / RoPE in
fp32) and torch runs `model.to(torch.bfloat16)` with SDPA attention.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np


@dataclass(frozen=True)
class Case:
    model: str
    image: int
    batch: int


CASES = {
    "s16-224": Case("dinov3_vits16", 224, 32),
    "b16-224": Case("dinov3_vitb16", 224, 32),
    "s16-512": Case("dinov3_vits16", 512, 8),
    "cnxt-t-224": Case("dinov3_convnext_tiny", 224, 32),
    "cnxt-b-224": Case("dinov3_convnext_base", 224, 16),
}


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_line(torch_device: str) -> str:
    import flax
    import torch
    import transformers

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    jax_dev = jax.devices()[0]
    parts = [
        f"CPU {cpu_model()} ({cores} cores usable)",
        f"jax {jax.__version__} on {jax_dev.platform}:{jax_dev.device_kind}",
        f"flax {flax.__version__}",
        f"torch {torch.__version__} on {torch_device} ({torch.get_num_threads()} threads)",
        f"transformers {transformers.__version__}",
        f"python {platform.python_version()}",
    ]
    return "machine: " + "; ".join(parts)


def randomise_layerscale(flat: dict[str, np.ndarray], rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Layer scale of 1e-5 (the official init) makes every block almost the identity, which would
    make the agreement check meaningless; values of order 1 exercise the blocks."""
    out = dict(flat)
    for key, value in flat.items():
        if key.endswith(".gamma"):  # ViT ls1/ls2, ConvNeXt blocks
            out[key] = rng.uniform(0.5, 1.5, value.shape).astype(value.dtype)
    return out


def build_pair(case: Case, dtype: str, attention: str, torch_device: str):
    """(our jitted forward, the torch model) with identical weights."""
    import torch
    from transformers import DINOv3ConvNextConfig, DINOv3ConvNextModel, DINOv3ViTConfig, DINOv3ViTModel

    from dinov3_jax.convert import convnext as cnxconv
    from dinov3_jax.convert import hf as hfconv
    from dinov3_jax.convert.ours import model_from_flat, model_to_flat
    from dinov3_jax.inference import jit_method
    from dinov3_jax.models.config import ConvNeXtConfig
    from dinov3_jax.models.registry import create_backbone

    rng = np.random.default_rng(0)
    base = create_backbone(case.model, seed=0)
    flat = randomise_layerscale(model_to_flat(base), rng)
    if isinstance(base.config, ConvNeXtConfig):  # no attention to choose
        model = model_from_flat(base.config.replace(dtype=dtype), flat)
        tmodel = DINOv3ConvNextModel(DINOv3ConvNextConfig(**cnxconv.config_to_hf(base.config))).eval()
        hf_flat = cnxconv.official_to_hf(cnxconv.official_from_ours(flat))
    else:
        model = model_from_flat(base.config.replace(dtype=dtype, attention_impl=attention), flat)
        hf_kwargs = {} if dtype == "float32" else {"attn_implementation": "sdpa"}
        tmodel = DINOv3ViTModel(DINOv3ViTConfig(**hfconv.config_to_hf(base.config), **hf_kwargs)).eval()
        hf_flat = hfconv.from_ours(flat, base.config)
    # The converters write the on-disk (4.x) names; the in-memory 5.x modules nest them under `model.`.
    wanted = set(tmodel.state_dict())
    sd = {}
    for key, value in hf_flat.items():
        key = key if key in wanted or "model." + key not in wanted else "model." + key
        sd[key] = torch.from_numpy(np.array(value))
    tmodel.load_state_dict(sd, strict=True)
    tmodel = tmodel.to(torch_device)
    if dtype != "float32":
        tmodel = tmodel.to(torch.bfloat16)

    forward = jit_method(model, "forward_features")
    return forward, tmodel, model


def our_tokens(out: dict) -> jax.Array:
    parts = [out["x_norm_clstoken"][:, None], out["x_storage_tokens"], out["x_norm_patchtokens"]]
    return jnp.concatenate(parts, axis=1)


def check_agreement(ours: np.ndarray, ref: np.ndarray, dtype: str) -> tuple[bool, str]:
    """fp32: max |Δ| ≤ 1e-4·max(1, max|ref|). bf16: per-token cosine similarity ≥ 0.99."""
    ours, ref = ours.astype(np.float64), ref.astype(np.float64)
    diff = float(np.abs(ours - ref).max())
    scale = max(1.0, float(np.abs(ref).max()))
    if dtype == "float32":
        ok = diff <= 1e-4 * scale
        return ok, f"max|Δ| {diff:.2e} (max|ref| {scale:.2f}, bound {1e-4 * scale:.1e})"
    cos = (ours * ref).sum(-1) / (np.linalg.norm(ours, axis=-1) * np.linalg.norm(ref, axis=-1) + 1e-30)
    ok = float(cos.min()) >= 0.99
    return ok, f"min per-token cosine {cos.min():.5f}, max|Δ| {diff:.2e} (max|ref| {scale:.2f})"


def token_loss(out: dict) -> jax.Array:
    """mean(tokens²) over every normed output token, in fp32."""
    return jnp.mean(jnp.square(our_tokens(out).astype(jnp.float32)))


def backward_pair(model, tmodel, rtol: float):
    """(ours: x → (loss, grads) jitted; torch: x → loss after loss.backward(); a check of ours'
    output against the gradients torch left in `tmodel`)."""
    from flax import nnx

    from dinov3_jax.convert import hf as hfconv
    from dinov3_jax.convert.ours import model_to_flat

    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def loss(params, x):
        return token_loss(nnx.merge(graphdef, params, rest).forward_features(x))

    # No inference compiler options: they slow the backward down (CPU-PERF.md).
    grad_fn = jax.jit(jax.value_and_grad(loss))

    def run_ours(x):
        return grad_fn(params, x)

    def run_torch(x):
        tmodel.zero_grad(set_to_none=True)
        loss_t = tmodel(pixel_values=x).last_hidden_state.float().square().mean()
        loss_t.backward()
        return loss_t

    def torch_grads(m, x) -> tuple[float, dict[str, np.ndarray]]:
        m.zero_grad(set_to_none=True)
        loss_t = m(pixel_values=x).last_hidden_state.square().mean()
        loss_t.backward()
        grads = {
            key.removeprefix("model."): np.zeros(tuple(p.shape)) if p.grad is None else p.grad.double().cpu().numpy()
            for key, p in m.named_parameters()
        }
        return float(loss_t), grads

    def errors(grads: dict[str, np.ndarray], ref: dict[str, np.ndarray]) -> dict[str, float]:
        """max|Δ| / max|ref| per tensor (the k bias, whose gradient is 0 up to rounding, is scaled
        by 1e-3 of the median tensor's max instead)."""
        scales = {k: float(np.abs(g).max()) for k, g in ref.items()}
        floor = 1e-3 * float(np.median([v for v in scales.values() if v > 0]))
        return {
            k: float(np.abs(np.asarray(grads[k], np.float64).reshape(r.shape) - r).max()) / max(scales[k], floor)
            for k, r in ref.items()
        }

    def check(out, x) -> tuple[bool, str]:
        """Ours' loss and gradients on `x` against torch in fp32 and in fp64 (a float64 copy of
        the model): fp32 gradients of this deep network are only good to a few 1e-3 (torch's own
        fp32 ones included), so ours pass when their error against fp64 is at most
        max(2 × torch fp32's, rtol)."""
        import copy

        value, grads = out
        ours = hfconv.from_ours(model_to_flat(nnx.merge(graphdef, grads, rest)), model.config)
        missing = [k for k, _ in tmodel.named_parameters() if k.removeprefix("model.") not in ours]
        if missing:
            return False, f"no gradient of ours for {missing[:3]}"
        loss32, t32 = torch_grads(tmodel, x)
        loss64, t64 = torch_grads(copy.deepcopy(tmodel).double(), x.double())
        e_ours, e_t32, e_vs_torch = errors(ours, t64), errors(t32, t64), errors(ours, t32)
        worst = lambda e: max(e.items(), key=lambda kv: kv[1])  # noqa: E731
        loss_diff = abs(float(value) - loss64) / max(abs(loss64), 1e-30)
        bound = max(2 * worst(e_t32)[1], rtol)
        ok = worst(e_ours)[1] <= bound and loss_diff <= rtol
        detail = (
            f"loss rel. diff vs fp64 {loss_diff:.1e} (torch fp32 {abs(loss32 - loss64) / abs(loss64):.1e}); "
            f"{len(e_ours)} gradients, worst max|Δ|/max|ref| vs torch fp64: ours fp32 {worst(e_ours)[1]:.1e} "
            f"({worst(e_ours)[0]}), torch fp32 {worst(e_t32)[1]:.1e} ({worst(e_t32)[0]}); "
            f"medians {np.median(list(e_ours.values())):.1e} / {np.median(list(e_t32.values())):.1e}; "
            f"ours vs torch fp32 directly {worst(e_vs_torch)[1]:.1e}; bound {bound:.1e}"
        )
        return ok, detail

    return run_ours, run_torch, check


def run_case(name: str, case: Case, args, torch_device: str) -> dict:
    import torch

    dtype = "float32" if args.dtype == "fp32" else "bfloat16"
    forward, tmodel, model = build_pair(case, dtype, args.attention, torch_device)
    if args.backward:
        forward, run_torch_fn, check = backward_pair(model, tmodel, args.grad_rtol)
    x_nchw = np.random.default_rng(1).standard_normal((case.batch, 3, case.image, case.image)).astype(np.float32)
    x_ours = jnp.asarray(x_nchw.transpose(0, 2, 3, 1))
    x_torch = torch.from_numpy(x_nchw).to(torch_device)
    if dtype != "float32":
        x_torch = x_torch.to(torch.bfloat16)

    def sync():
        if torch_device == "cuda":
            torch.cuda.synchronize()

    def run_ours():
        return jax.block_until_ready(forward(x_ours))

    def run_torch():
        if args.backward:
            out = run_torch_fn(x_torch)
        else:
            with torch.inference_mode():
                out = tmodel(pixel_values=x_torch).last_hidden_state
        sync()
        return out

    t0 = time.perf_counter()
    out = run_ours()
    compile_s = time.perf_counter() - t0
    if args.backward:
        ok, detail = check(out, x_torch)
    else:
        ref = run_torch()
        ok, detail = check_agreement(np.asarray(our_tokens(out), np.float32), ref.float().cpu().numpy(), dtype)
    print(f"  torch attention implementation: {tmodel.config._attn_implementation!r}")
    print(f"  agreement {'OK' if ok else 'MISMATCH'}: {detail}; first call of ours (compile) {compile_s:.1f} s")
    for _ in range(args.warmup):
        run_ours()
        run_torch()

    t_ours, t_torch = [], []
    for i in range(args.repeats):
        # Alternate which goes first, so that neither always runs right after the other.
        order = (("ours", run_ours), ("torch", run_torch))
        for label, fn in order if i % 2 == 0 else order[::-1]:
            t0 = time.perf_counter()
            fn()
            (t_ours if label == "ours" else t_torch).append(time.perf_counter() - t0)
    med_ours, med_torch = statistics.median(t_ours), statistics.median(t_torch)
    result = {
        "case": name,
        "model": case.model,
        "image": case.image,
        "batch": case.batch,
        "ours_ips": case.batch / med_ours,
        "torch_ips": case.batch / med_torch,
        "ratio": med_torch / med_ours,  # throughput ours / torch
        "ratio_best": min(t_torch) / min(t_ours),
        "ok": ok,
    }
    print(
        f"  ours  median {med_ours * 1e3:8.1f} ms  (min {min(t_ours) * 1e3:.1f}, max {max(t_ours) * 1e3:.1f})"
        f"  {result['ours_ips']:8.1f} img/s"
    )
    print(
        f"  torch median {med_torch * 1e3:8.1f} ms  (min {min(t_torch) * 1e3:.1f}, max {max(t_torch) * 1e3:.1f})"
        f"  {result['torch_ips']:8.1f} img/s"
    )
    print(f"  throughput ratio ours/torch {result['ratio']:.2f} (medians), {result['ratio_best']:.2f} (best runs)")
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="+", choices=list(CASES), default=list(CASES), help="cases to run")
    # (with --backward the ConvNeXt cases are dropped)
    parser.add_argument("--repeats", type=int, default=5, help="timed calls of each model per case")
    parser.add_argument("--warmup", type=int, default=1, help="untimed calls of each after the first")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--attention", choices=("xla", "cudnn"), default="xla", help="our attention kernel")
    parser.add_argument("--backward", action="store_true", help="time forward + backward (ViT cases)")
    parser.add_argument("--batch", type=int, help="batch size of every case (default: the case's)")
    parser.add_argument("--grad-rtol", type=float, default=1e-3, help="gradient agreement bound (--backward)")
    args = parser.parse_args(argv)
    if args.backward:
        vit_cases = [name for name in args.cases if "cnxt" not in name]
        if vit_cases != args.cases:
            print(f"--backward: ViT cases only, running {vit_cases}", file=sys.stderr)
        args.cases = vit_cases

    import torch
    import transformers

    transformers.logging.set_verbosity_error()
    torch_device = "cuda" if jax.default_backend() == "gpu" and torch.cuda.is_available() else "cpu"
    if jax.default_backend() != "cpu" and torch_device == "cpu":
        print("warning: JAX runs on an accelerator but torch has no CUDA: torch numbers are CPU", file=sys.stderr)
    if args.dtype == "bf16" and torch_device == "cpu":
        print("warning: bf16 on CPU is slow for both (no bf16 matmul units used); meant for GPUs", file=sys.stderr)
    if torch_device == "cuda" and args.dtype == "fp32":
        # Same precision on both sides: no TF32 (PARITY.md §6).
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        jax.config.update("jax_default_matmul_precision", "highest")

    print(machine_line(torch_device))
    print(f"date: {datetime.datetime.now().astimezone().isoformat(timespec='minutes')}")
    print(
        f"dtype {args.dtype}; our attention {args.attention!r}; torch attention: the model default (fp32) or 'sdpa' (bf16); "
        f"{args.repeats} timed calls each, alternating, median"
    )
    results = []
    mode = "forward + backward (value_and_grad / loss.backward())" if args.backward else "forward"
    print(f"mode: {mode}")
    for name in args.cases:
        case = CASES[name]
        if args.batch:
            case = Case(case.model, case.image, args.batch)
        print(f"\n{name}: {case.model}, {case.image} px, batch {case.batch}")
        results.append(run_case(name, case, args, torch_device))

    print("\n| case | model | image | batch | ours img/s | torch img/s | ours/torch | ours/torch (best runs) |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in results:
        print(
            f"| {r['case']} | {r['model']} | {r['image']} | {r['batch']} | {r['ours_ips']:.1f} | "
            f"{r['torch_ips']:.1f} | {r['ratio']:.2f} | {r['ratio_best']:.2f} |"
        )
    return 0 if all(r["ok"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
