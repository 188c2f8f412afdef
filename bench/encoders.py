"""Time our numpy encoders against transformers' on the real Phi-4-multimodal shapes (random weights).

    python bench/encoders.py [--threads 1,2] [--repeats 3] [--only vision|audio] [--no-sdpa]

Vision: SigLIP so400m (27 layers, the 26 used; 1152 wide, 16 heads, MLP 4304, patch 14, crop 448)
+ projector to 3072. Audio: 24 conformer blocks (1024 wide, 16 heads, FFN 1536, 1024 NeMo conv
channels, bias distance 500) + projector to 3072.

The transformers modules (`Phi4MultimodalImageEmbedding`, `Phi4MultimodalAudioEmbedding`, eager
attention: the correct reference, see docs/model.md, "transformers as the reference") get random
weights, rounded to bf16 values as the real checkpoint's are; our GGUFs are written from their
state_dict with the converters and loaded with our encoders, so both run the same weights. Ours is
timed from the bf16 file the converter writes (weights widened a matrix at a time); the "bf16 file
vs f32 file" rows are the cost of that widening against holding every weight in float32.
Each thread count runs in its own process: numpy's OpenBLAS reads OPENBLAS_NUM_THREADS /
OMP_NUM_THREADS at import, torch gets torch.set_num_threads(n).

Timed: the encoder forward only, from preprocessed inputs to the decoder embeddings
    vision  crops (1+N, 3, 448, 448) + masks -> (n_tokens, 3072)   tower + pool + HD layout + projector
    audio   log-mel (T, 80) -> (ceil(T/8), 3072)                    conformer + speech projector
Preprocessing (our make_crops / LogMel vs transformers' image processor / feature extractor) is
timed separately. Runs are interleaved (ours, reference, ours, reference, ...); the figures are
medians and the ratio is reference time / our time (> 1: ours is faster), in wall-clock time and
in process CPU time (which other processes competing for the cores do not inflate; with 2 threads
it also counts spinning worker threads).

The "GEMMs alone" rows replay the matrix products of one of our runs (from the f32 file, whose
weights need no widening) as bare numpy matmuls of the same shapes (`linear_floor`, `tower_gemm_floor`): how fast float32 numpy could be at best.

transformers computes all 27 vision layers (+ post_layernorm + pooling head) to return
hidden_states[-2]; "eager-26" is the same module cut to 26 layers, i.e. the same work as ours.
SDPA is shown for information: for the audio it equals eager; for vision it is WRONG on crops
without padded patches (no mask -> SDPA applies `is_causal=True`; docs/model.md, "Vision encoder" and
"transformers as the reference"), see "err".
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys


def _args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", default="1,2", help="comma-separated thread counts (one process each)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs of each side per case")
    p.add_argument("--only", choices=("vision", "audio"), help="run one encoder only")
    p.add_argument("--no-sdpa", action="store_true", help="skip the (informative) SDPA reference")
    p.add_argument("--cache", default=os.path.join(os.environ.get("TMPDIR", "/tmp"), "phi4mm-bench-encoders"),
                   help="where the random-weight GGUFs are written (reused between thread counts)")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    return p.parse_args(argv)


if __name__ == "__main__":
    ARGS = _args()
    if not ARGS.child:  # one process per thread count: BLAS thread pools are sized at import
        for n in ARGS.threads.split(","):
            env = dict(os.environ, OPENBLAS_NUM_THREADS=n, OMP_NUM_THREADS=n, MKL_NUM_THREADS=n)
            # argparse keeps the last --threads: the child sees exactly one count
            cmd = [sys.executable, os.path.abspath(__file__)] + sys.argv[1:] + ["--child", "--threads", n]
            rc = subprocess.call(cmd, env=env)
            if rc:
                sys.exit(rc)
        sys.exit(0)

# -- child: numpy / torch are imported only now ---------------------------------------------------
import gc  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
import types  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402

sys.modules.setdefault("torchvision._meta_registrations", types.ModuleType("torchvision._meta_registrations"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from tests.signals import random_image, speechlike  # noqa: E402

SR = 16000
PAUSE_S = 0.5   # before each timed run (see `interleaved`)
TEXT_HIDDEN = 3072
VISION = dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
              image_size=448, patch_size=14, crop_size=448, feature_layer=-2)
AUDIO = dict(hidden_size=1024, intermediate_size=1536, num_blocks=24, num_attention_heads=16,
             nemo_conv_channels=1024, ext_pw_out_channel=1024, depthwise_separable_out_channel=1024,
             bias_max_distance=500, input_size=80, time_reduction=8, kernel_size=3)
IMAGES = [("896x448 (2 crops + global)", 896, 448, None),
          ("640x480 webcam, max_crops 4", 640, 480, 4)]
CLIPS = [("5 s", 5.0), ("30 s", 30.0)]


# -- helpers --------------------------------------------------------------------------------------

@dataclass
class Timing:
    wall: float   # median wall-clock seconds
    cpu: float    # median process CPU seconds (all threads): robust to other processes taking the CPU


def interleaved(fns: dict, repeats: int, warm: bool = True) -> dict[str, Timing]:
    """(Warm each function once,) then run them round-robin `repeats` times; medians.

    Each run starts after a pause: OpenBLAS's and OpenMP's worker threads spin for a while after
    a call, and on 2 cores the spinning threads of one library would slow the other's next run."""
    for f in fns.values() if warm else ():
        f()
    wall, cpu = {k: [] for k in fns}, {k: [] for k in fns}
    for _ in range(repeats):
        for k, f in fns.items():
            time.sleep(PAUSE_S)
            t, c = time.perf_counter(), time.process_time()
            f()
            wall[k].append(time.perf_counter() - t)
            cpu[k].append(time.process_time() - c)
    return {k: Timing(statistics.median(wall[k]), statistics.median(cpu[k])) for k in fns}


def rel_err(ours: np.ndarray, ref: np.ndarray) -> float:
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


def randomize(module: torch.nn.Module, seed: int) -> None:
    """Weights ~ N(0, 1/fan_in) (unit-variance outputs), norms ~1, small biases: O(1) activations."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if ("layer_norm" in name or "layernorm" in name) and name.endswith("weight"):
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            elif name.endswith("bias_values.weight") or "extensor" in name or "position_embedding" in name:
                p.copy_(0.5 * torch.randn(p.shape, generator=g))
            elif p.ndim >= 2:
                p.copy_(torch.randn(p.shape, generator=g) / np.sqrt(np.prod(p.shape[1:])))
            else:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
        for p in module.parameters():   # bf16 values, as the real checkpoint holds
            p.copy_(p.to(torch.bfloat16).to(torch.float32))



def set_attn(config, impl: str) -> None:
    config._attn_implementation = impl


def reference_module(cls, config, encoder_config, seed: int) -> torch.nn.Module:
    """transformers' embedding module `cls` with eager attention and random weights (`randomize`)."""
    set_attn(config, "eager")
    set_attn(encoder_config, "eager")
    torch.manual_seed(0)
    module = cls(config).eval()
    randomize(module, seed)
    return module


ROWS: list[str] = []


def row(enc, case, what, ours: Timing, ref: Timing, extra=""):
    line = (f"| {enc} | {case} | {what} | {ours.wall * 1e3:.0f} / {ours.cpu * 1e3:.0f} |"
            f" {ref.wall * 1e3:.0f} / {ref.cpu * 1e3:.0f} | **{ref.wall / ours.wall:4.2f}x** | {ref.cpu / ours.cpu:4.2f}x |"
            f" {extra} |")
    ROWS.append(line)
    print(line, flush=True)


# -- vision ---------------------------------------------------------------------------------------

def bench_vision(args, cache: Path) -> None:
    from transformers import Phi4MultimodalConfig
    from transformers.models.phi4_multimodal.image_processing_phi4_multimodal import (
        Phi4MultimodalImageProcessor,
    )
    from transformers.models.phi4_multimodal.modeling_phi4_multimodal import Phi4MultimodalImageEmbedding

    from convert.vision_encoder import write_vision_encoder
    from model.image_crops import make_crops
    from model.vision_encoder import VisionEncoder

    config = Phi4MultimodalConfig(hidden_size=TEXT_HIDDEN, vision_config=dict(VISION))
    module = reference_module(Phi4MultimodalImageEmbedding, config, config.vision_config, seed=1)
    tower_cfg = module.img_processor.config
    state = {k: v.detach().numpy() for k, v in module.state_dict().items()}
    paths = {}
    for outtype in ("bf16", "f32"):
        paths[outtype] = path = cache / f"vision-bf16-weights-{outtype}.gguf"
        if not path.exists():
            write_vision_encoder(state, config.vision_config.to_dict(), path.with_suffix(".tmp"), outtype,
                                 progress=False)
            path.with_suffix(".tmp").rename(path)
    del state
    ours, ours_f32 = VisionEncoder.load(paths["bf16"]), VisionEncoder.load(paths["f32"])
    processor = Phi4MultimodalImageProcessor()
    last = module.img_processor.encoder.layers[-1]

    def variant(impl: str, skip_last: bool):
        """transformers' forward with `impl` attention; skip_last: the unused last layer made a no-op."""
        def run():
            set_attn(tower_cfg, impl)
            if skip_last:
                last.forward = lambda hidden_states, *a, **k: hidden_states
            try:
                with torch.no_grad():
                    return module(ids, zeros, image_pixel_values=inputs["image_pixel_values"],
                                  image_sizes=inputs["image_sizes"],
                                  image_attention_mask=inputs["image_attention_mask"])[0].numpy()
            finally:
                set_attn(tower_cfg, "eager")
                last.__dict__.pop("forward", None)
        return run

    for label, w, h, max_crops in IMAGES:
        image = random_image(w, h, seed=w + h)
        mc = ours.cfg.max_crops if max_crops is None else max_crops
        inputs = processor(image, return_tensors="pt", dynamic_hd=mc)
        crops = make_crops(image, max_crops=mc)
        n = int(inputs["num_img_tokens"][0])
        case = f"{label}: {crops.pixels.shape[0]} crops, {n} tokens"
        ids = torch.full((1, n), config.vision_config.image_token_id)
        zeros = torch.zeros(1, n, TEXT_HIDDEN)

        def ours_run():
            return ours.embed_crops(crops.pixels, crops.masks, crops.image_size)

        def ours_f32_run():
            return ours_f32.embed_crops(crops.pixels, crops.masks, crops.image_size)

        fns = {"ours": ours_run, "ours-f32": ours_f32_run, "eager-27": variant("eager", False),
               "eager-26": variant("eager", True)}
        if not args.no_sdpa:
            fns["sdpa-26"] = variant("sdpa", True)
        mine = ours_run()   # the error checks double as warm-up runs
        err = {k: rel_err(mine, f()) for k, f in fns.items() if k != "ours"}
        t = interleaved(fns, args.repeats, warm=False)
        row("vision", case, "forward vs eager-27 (as shipped)", t["ours"], t["eager-27"], f"err {err['eager-27']:.1e}")
        row("vision", case, "forward vs eager-26 (same work)", t["ours"], t["eager-26"], f"err {err['eager-26']:.1e}")
        row("vision", case, "bf16 file vs f32 file (ours)", t["ours"], t["ours-f32"],
            f"err {err['ours-f32']:.0e}: the cost of widening the weights at each use")
        row("vision", case, "our tower's GEMMs alone vs eager-27", tower_gemm_floor(ours_f32_run, args.repeats),
            t["eager-27"], "the best ratio f32 numpy could reach: everything but the tower's products free")
        if "sdpa-26" in t:
            row("vision", case, "forward vs sdpa-26 (info)", t["ours"], t["sdpa-26"],
                f"err {err['sdpa-26']:.1e}" + (" (causal!)" if err["sdpa-26"] > 1e-3 else ""))
        t = interleaved({"ours": lambda: make_crops(image, max_crops=mc),
                         "ref": lambda: processor(image, return_tensors="pt", dynamic_hd=mc)}, args.repeats)
        row("vision", label, "preprocessing (crops)", t["ours"], t["ref"])


# -- audio ----------------------------------------------------------------------------------------

def bench_audio(args, cache: Path) -> None:
    from transformers import Phi4MultimodalConfig, Phi4MultimodalFeatureExtractor
    from transformers.models.phi4_multimodal.modeling_phi4_multimodal import Phi4MultimodalAudioEmbedding

    from convert.audio_encoder import write_audio_encoder
    from model.speech_encoder import SpeechEncoder

    config = Phi4MultimodalConfig(hidden_size=TEXT_HIDDEN, audio_config=dict(AUDIO))
    module = reference_module(Phi4MultimodalAudioEmbedding, config, config.audio_config, seed=2)
    fe = Phi4MultimodalFeatureExtractor()
    feats = fe(speechlike(10 * SR, seed=1), sampling_rate=SR, return_tensors="np")["audio_input_features"][0]
    with torch.no_grad():
        enc = module.encoder.encoder_embedding
        enc.global_mean.copy_(torch.from_numpy(feats.mean(0)))
        enc.global_invstd.copy_(torch.from_numpy(1.0 / (feats.std(0) + 0.5)))
    enc_cfg = module.encoder.config
    tensors = {k: v.detach().numpy() for k, v in module.state_dict().items()}
    paths = {}
    for outtype in ("bf16", "f32"):
        paths[outtype] = path = cache / f"audio-bf16-weights-{outtype}.gguf"
        if not path.exists():
            write_audio_encoder(tensors, config.audio_config.to_dict(), path.with_suffix(".tmp"), outtype=outtype,
                                progress=False)
            path.with_suffix(".tmp").rename(path)
    del tensors
    ours, ours_f32 = SpeechEncoder.load(paths["bf16"]), SpeechEncoder.load(paths["f32"])
    token = config.audio_config.audio_token_id

    for label, seconds in CLIPS:
        x = speechlike(int(seconds * SR), seed=int(seconds))
        out = fe(x, sampling_rate=SR, return_tensors="pt")
        n = int(out["audio_embed_sizes"][0])
        case = f"{label} clip: {out['audio_input_features'].shape[1]} frames, {n} tokens"
        ids = torch.full((1, n), token)
        zeros = torch.zeros(1, n, TEXT_HIDDEN)
        feats_np = ours.features(x)

        def variant(impl: str):
            def run():
                set_attn(enc_cfg, impl)
                try:
                    with torch.no_grad():
                        return module(input_ids=ids, inputs_embeds=zeros,
                                      audio_input_features=out["audio_input_features"],
                                      audio_embed_sizes=out["audio_embed_sizes"],
                                      audio_projection_mode="speech")[0].numpy()
                finally:
                    set_attn(enc_cfg, "eager")
            return run

        def ours_run():
            return ours.project(ours.encoder(feats_np), "speech")

        def ours_f32_run():
            return ours_f32.project(ours_f32.encoder(feats_np), "speech")

        fns = {"ours": ours_run, "ours-f32": ours_f32_run, "eager": variant("eager")}
        if not args.no_sdpa:
            fns["sdpa"] = variant("sdpa")
        mine = ours_run()
        err = {k: rel_err(mine, f()) for k, f in fns.items() if k != "ours"}
        t = interleaved(fns, args.repeats, warm=False)
        row("audio", case, "forward vs eager", t["ours"], t["eager"], f"err {err['eager']:.1e}")
        row("audio", case, "bf16 file vs f32 file (ours)", t["ours"], t["ours-f32"],
            f"err {err['ours-f32']:.0e}: the cost of widening the weights at each use")
        floor = linear_floor(ours_f32_run, args.repeats)
        row("audio", case, "our Linear GEMMs alone vs eager", floor, t["eager"],
            "the best ratio f32 numpy could reach: everything but the Linear products free")
        if "sdpa" in t:
            row("audio", case, "forward vs sdpa (info)", t["ours"], t["sdpa"], f"err {err['sdpa']:.1e}")
        t = interleaved({"ours": lambda: ours.features(x),
                         "ref": lambda: fe(x, sampling_rate=SR, return_tensors="pt")}, args.repeats)
        row("audio", label, "preprocessing (log-mel)", t["ours"], t["ref"])


def linear_floor(run, repeats: int) -> Timing:
    """The time of `run`'s conformer Linear products alone: each `Linear` call of one run is
    recorded (input rows, weight) and replayed as a bare `x @ wt` on random inputs of that shape.
    The attention score products (4% of the FLOPs at 30 s) and all elementwise work are left out."""
    from model.layers import Linear

    calls, call = [], Linear.__call__
    Linear.__call__ = lambda self, x: (calls.append((x.shape[0], self.weight().T)), call(self, x))[1]
    try:
        run()
    finally:
        Linear.__call__ = call
    rng, inputs = np.random.default_rng(0), {}
    for rows, wt in calls:
        if (rows, wt.shape[0]) not in inputs:
            inputs[rows, wt.shape[0]] = rng.standard_normal((rows, wt.shape[0]), dtype=np.float32)

    def replay():
        for rows, wt in calls:
            inputs[rows, wt.shape[0]] @ wt
    return interleaved({"floor": replay}, repeats)["floor"]


def tower_gemm_floor(run, repeats: int) -> Timing:
    """The time of `run`'s SigLIP matrix products alone: each block call of one run is recorded
    (tokens, crops) and its products replayed as bare matmuls on random inputs of their shapes:
    q/k/v, output and MLP projections of all tokens, and per crop and head q k^T and s v.
    Patch embedding, pooling, projector and all elementwise work are left out."""
    from model.vision_encoder import Block

    calls, call = [], Block.__call__
    Block.__call__ = lambda self, x, segments: (calls.append((self, x.shape[0], segments)), call(self, x, segments))[1]
    try:
        run()
    finally:
        Block.__call__ = call
    rng, inputs = np.random.default_rng(0), {}

    def random_inputs(block: Block, N: int, segments) -> tuple:
        """(x, mlp hidden, [(q, k^T, v) per crop]) for one tower batch, made once per shape."""
        crops = tuple((seg.end - seg.start, seg.end - seg.start if seg.keys is None else len(seg.keys))
                      for seg in segments)
        if (N, crops) not in inputs:
            rand = lambda *shape: rng.standard_normal(shape, dtype=np.float32)
            C, F, d = block.o.out_features, block.up.out_features, block.head_dim
            inputs[N, crops] = rand(N, C), rand(N, F), [(rand(n, d), rand(d, m), rand(m, d)) for n, m in crops]
        return inputs[N, crops]

    plan = [(block, random_inputs(block, N, segments)) for block, N, segments in calls]

    def replay():
        for block, (x, h, crops) in plan:
            x @ block.qkv.weight().T, x @ block.o.weight().T, x @ block.up.weight().T, h @ block.down.weight().T
            for q, k_t, v in crops * block.heads:
                (q @ k_t) @ v
    return interleaved({"floor": replay}, repeats)["floor"]


def sgemm_floor(repeats: int) -> None:
    """Plain 1024^3 sgemm: numpy (OpenBLAS) vs torch (MKL) at the same thread count."""
    rng = np.random.default_rng(0)
    a, b = (rng.standard_normal((1024, 1024), dtype=np.float32) for _ in range(2))
    ta, tb = torch.from_numpy(a), torch.from_numpy(b)
    t = interleaved({"ours": lambda: a @ b, "ref": lambda: ta @ tb}, max(5, 3 * repeats))
    gf = 2 * 1024 ** 3 / 1e9
    row("sgemm", "1024x1024 @ 1024x1024", "numpy vs torch", t["ours"], t["ref"],
        f"numpy {gf / t['ours'].wall:.0f} GFLOP/s, torch {gf / t['ref'].wall:.0f} GFLOP/s (wall)")


def main(args) -> None:
    n = int(args.threads)
    torch.set_num_threads(n)
    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    print(f"\n## threads = {n} (torch {torch.__version__}, numpy {np.__version__}, "
          f"OPENBLAS_NUM_THREADS={os.environ.get('OPENBLAS_NUM_THREADS')})", flush=True)
    print("| encoder | case | timed | ours ms wall / CPU | transformers ms wall / CPU | ratio (wall) |"
          " ratio (CPU time) | note |\n|---|---|---|---:|---:|---:|---:|---|", flush=True)
    sgemm_floor(args.repeats)
    if args.only in (None, "audio"):
        bench_audio(args, cache)
        gc.collect()
    if args.only in (None, "vision"):
        bench_vision(args, cache)


if __name__ == "__main__":
    main(ARGS)
