"""Issue 26, reduced to torch alone: oneDNN's AVX2 `jit_1x1:avx2` backward-weights kernel corrupts the heap on a
channels-last 1x1 stride-2 convolution with fewer than 8 input channels (ResNet-18's first downsampling shortcut,
Conv2d(4, 8, 1, stride=2), at --width 4).

    python .ci/onednn_repro.py                 # exit 0: not reproduced; the bug: a crash (134/139), a hang
                                               # (the watchdog's exit 1) or a wrong weight gradient (exit 2)
    python .ci/onednn_repro.py --threads 2     # 2 threads: a hang (exit 1) or a wrong weight gradient (exit 2)
    python .ci/onednn_repro.py --nchw          # control: the same conv in NCHW passes

Seen with torch 2.13.0+cpu (oneDNN v3.12.0) under ONEDNN_MAX_CPU_ISA=AVX2, in the first backward(), every time:
1 thread: SIGSEGV (139) or "double free or corruption" SIGABRT (134); 2 threads: mostly a hang spinning both
cores, and where it survives a weight gradient off by ~50-70% of its size (the input gradient is right). Needs the
WEIGHT gradient: the input gradient alone (brgconv_strided:avx2 backward_data) passes. ONEDNN_VERBOSE=1's last
line is that backward_data one, as the crashing backward_weights never finishes to print its own (=all shows its
create). Native AVX-512, ONEDNN_MAX_CPU_ISA=SSE41, NCHW and torch.backends.mkldnn.enabled=False pass.
Not part of the pytest suite.
"""
import argparse
import faulthandler
import os
import re
import sys

p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
p.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS (1: crash; 2: hang or wrong weight gradient)")
p.add_argument("--isa", default="AVX2", help="ONEDNN_MAX_CPU_ISA (AVX2 reproduces on an AVX-512 CPU; '' = native)")
p.add_argument("--cin", type=int, default=4, help="input channels (2..7 crash; 1, 8, 12, 16, 64 pass)")
p.add_argument("--cout", type=int, default=8)
p.add_argument("--kernel", type=int, default=1, help="1 crashes; 3 passes")
p.add_argument("--stride", type=int, default=2, help="2 crashes; 1 and 3 pass")
p.add_argument("--batch", type=int, default=64, help="any batch >= 2 crashes (batch 1 does not reach oneDNN)")
p.add_argument("--size", type=int, default=32, help="input height = width")
p.add_argument("--iters", type=int, default=20, help="forward+backward rounds (the first one crashes)")
p.add_argument("--nchw", action="store_true", help="plain NCHW instead of channels-last (control)")
p.add_argument("--no-weight-grad", action="store_true", help="input gradient only (control: passes)")
p.add_argument("--timeout", type=float, default=15, help="seconds before a hang is declared (exit 1)")
a = p.parse_args()

# Both must be set before torch (and so oneDNN and OpenMP) loads.
os.environ["OMP_NUM_THREADS"] = str(a.threads)
if a.isa:
    os.environ["ONEDNN_MAX_CPU_ISA"] = a.isa
import torch  # noqa: E402

onednn = re.search(r"MKL-DNN (v[\d.]+)", torch.__config__.show())
print(f"torch {torch.__version__}, oneDNN {onednn.group(1) if onednn else '?'}, "
      f"mkldnn available={torch.backends.mkldnn.is_available()} enabled={torch.backends.mkldnn.enabled}, "
      f"ONEDNN_MAX_CPU_ISA={os.environ.get('ONEDNN_MAX_CPU_ISA', '(native)')}, threads={torch.get_num_threads()}",
      flush=True)
layout = torch.contiguous_format if a.nchw else torch.channels_last
print(f"Conv2d({a.cin}, {a.cout}, {a.kernel}, stride={a.stride}, bias=False), input [{a.batch}, {a.cin}, {a.size}, "
      f"{a.size}] {'NCHW' if a.nchw else 'channels_last'}, grads: input"
      f"{'' if a.no_weight_grad else ' + weight'}, {a.iters} iterations", flush=True)

faulthandler.enable()  # a traceback on SIGSEGV/SIGABRT
faulthandler.dump_traceback_later(a.timeout, exit=True)  # a hang: traceback, then exit 1 (a C thread: works without the GIL)
torch.manual_seed(0)
conv = torch.nn.Conv2d(a.cin, a.cout, a.kernel, stride=a.stride, padding=a.kernel // 2, bias=False)
conv = conv.to(memory_format=layout).requires_grad_(not a.no_weight_grad)


def grads(x, mkldnn):
    conv.zero_grad(set_to_none=True)
    x = x.detach().requires_grad_()
    torch.backends.mkldnn.enabled = mkldnn  # off: ATen's own (slow, correct) convolution
    conv(x).square().sum().backward()  # oneDNN: forward, backward_data, backward_weights (jit_1x1:avx2)
    torch.backends.mkldnn.enabled = True
    return x.grad, conv.weight.grad


for i in range(a.iters):
    x = torch.randn(a.batch, a.cin, a.size, a.size).contiguous(memory_format=layout)
    ref = grads(x, False)
    got = grads(x, True)  # the bug: SIGSEGV / SIGABRT / hang here, or a wrong weight gradient
    for name, r, g in zip(("input", "weight"), ref, got):
        if g is not None and not torch.allclose(g, r, rtol=1e-3, atol=1e-3 * r.abs().max().item()):
            print(f"WRONG {name} gradient at iteration {i}: max |oneDNN - reference| {(g - r).abs().max():.4g}, "
                  f"max |reference| {r.abs().max():.4g}", flush=True)
            sys.exit(2)
faulthandler.cancel_dump_traceback_later()
print(f"OK: {a.iters} iterations, no crash, gradients match the non-oneDNN reference (bug not reproduced)")
