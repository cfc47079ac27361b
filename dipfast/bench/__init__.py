"""The benchmark harness (issue 3): iterations/s, time-to-PSNR and paper-protocol quality.

    python -m dipfast.bench throughput|time-to-psnr|quality|profile|floor|summary [...] [--out DIR]

One idea per module: data (the inputs), original_loop (the notebooks' loop, the baseline of
every speed-up), runs (one fit of any method, timed), baselines (bicubic, NLM, BM3D),
throughput, time_to_psnr, quality, profile (the measuring suites), floor (the cost model of one
iteration) and kernel_groups (CUDA kernel names -> its op groups), memory, machine, report (JSON,
Markdown, plots), worker (cold runs in a fresh process), lost_context (a run that goes on in a fresh
process after a sticky CUDA error) and cli. NVTX ranges live in
dipfast.nvtx_ranges. Importing this package imports nothing heavy.
"""
