"""Command line: a thin layer over the library.

    diffalign train CONFIG.yaml [--set key=value ...] [--out DIR]
    diffalign train --resume DIR
    diffalign pretrain MODEL
    diffalign methods | rewards | models
    diffalign models make-tiny-sd OUT | make-tiny-sd3 OUT [--no-t5] | make-tiny-flux OUT [--no-guidance] | make-tiny-clip OUT
    diffalign eval RUN_DIR [--per-prompt N] [--seed S]
    diffalign sample RUN_DIR --out PATH [--n N] [--prompts P ...] [--seed S] [--base]
    diffalign export RUN_DIR --out DIR [--merge]
    diffalign bench sampler [--model NAME|PATH] [--batch N] [--steps S]
    diffalign bench step [--methods a,b] [--repeats R]
    diffalign bench memory [--config alignprop.yaml] [--steps K]   or   bench memory --sharding [--processes 1,2]
    diffalign bench suite --suite digits|toy2d|digits-flow|toy2d-flow|digits-minority|digits-rotated [--methods a,b] [--seeds K] [--budget N] [--out DIR] [--quick] [--reference M]
                          [--feedback paired|unpaired|imbalanced]
    diffalign bench tune --suite SUITE --methods a,b [--trials 8] [--seeds 5] [--metric M] [--out DIR]
    diffalign demo [--out DIR]
    diffalign data pairs --model digits --reward classifier --n 512 --out DIR [--bt-noise T] [--seed S]
    diffalign data labels --pairs DIR/pairs.jsonl --out DIR    (or --model M --reward R: new pairs, then labels)
    diffalign data images|candidates --model digits --n 64 [--per-prompt K] --out DIR   (unlabelled, for `label`)
    diffalign label DIR [--host 127.0.0.1] [--port 8765]
    diffalign reward serve SPEC [--host 127.0.0.1] [--port 8000] [--device cpu] [--max-batch 256]
    diffalign bench reward [--reward classifier] [--batch 64] [--repeats 7]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def _train(a) -> int:
    from .run_folder import open_run
    from .train import resolve_config, train

    if a.resume:
        if a.config:
            raise SystemExit("give either CONFIG or --resume DIR, not both")
        folder = open_run(a.resume)
        cfg, args = folder.config(a.set)
        out = folder.folder
        summary = train(cfg, args, out, resume=True)
    else:
        if not a.config:
            raise SystemExit("usage: diffalign train CONFIG.yaml [--set key=value ...] [--out DIR]")
        cfg, args = resolve_config(a.config, a.set)
        out = Path(a.out or f"runs/{cfg.method}-{Path(cfg.model).name}-{time.strftime('%Y%m%d-%H%M%S')}")
        summary = train(cfg, args, out)
    if summary.get("finished"):
        print(format_summary(summary))
        print(f"run folder: {out}")
    return 0


def format_summary(summary: dict) -> str:
    """summary.json's content (or `train`'s result) as the results table."""
    from .eval.results import Summary, format_table

    return format_table(Summary.from_json(summary))


def _pretrain(a) -> int:
    from .models import load_model

    model = load_model(a.model)
    print(f"{a.model}: cached at {model.path}")
    return 0


def _eval(a) -> int:
    from .eval import EvalResult, evaluate_run, format_table

    result = evaluate_run(a.run, per_prompt=a.per_prompt, seed=a.seed, n=a.n)
    print(format_table(EvalResult.from_json(result)))
    print(f"written: {Path(a.run) / 'eval.json'}")
    return 0


def _sample(a) -> int:
    from .eval import sample_run

    r = sample_run(a.run, a.out, n=a.n, prompts=a.prompts, seed=a.seed, base=a.base)
    print(f"{r['n']} samples of the {r['model']} model ({r['checkpoint']}), {r['per_prompt']} per prompt: "
          f"{r['path']} (tensors: {r['tensors']})")
    return 0


def _export(a) -> int:
    from .export import export_run

    out = export_run(a.run, a.out, merge=a.merge, base_model=a.base_model)
    how = "from_pretrained(DIR)" if a.merge or not (out / "pytorch_lora_weights.safetensors").exists() else \
        "from_pretrained(DIR).load_lora_weights(DIR)"
    print(f"{out}: a diffusers pipeline folder; load it with {how}")
    return 0


def _list(kind: str) -> int:
    if kind == "methods":
        from .methods import list_methods

        rows = list_methods()
    elif kind == "rewards":
        from .rewards import list_rewards

        rows = [(n, f"{'[differentiable] ' if d else ''}{desc}") for n, desc, d in list_rewards()]
    else:
        from .models import list_models

        rows = list_models()
    w = max(len(n) for n, _ in rows)
    for name, desc in rows:
        print(f"{name.ljust(w)}  {desc}")
    return 0


def _models(a) -> int:
    if a.action is None:
        return _list("models")
    if not a.out:
        raise SystemExit(f"usage: diffalign models {a.action} OUT")
    from .models import tiny

    if a.no_t5 and a.action != "make-tiny-sd3":
        raise SystemExit("--no-t5 applies to make-tiny-sd3 only")
    if a.no_guidance and a.action != "make-tiny-flux":
        raise SystemExit("--no-guidance applies to make-tiny-flux only")
    make = {"make-tiny-sd": tiny.make_tiny_sd, "make-tiny-clip": tiny.make_tiny_clip,
            "make-tiny-sd3": lambda out, seed: tiny.make_tiny_sd3(out, seed=seed, t5=not a.no_t5),
            "make-tiny-flux": lambda out, seed: tiny.make_tiny_flux(out, seed=seed, guidance=not a.no_guidance)}[a.action]
    print(f"{a.action}: wrote {make(a.out, seed=a.seed)} (random weights: for tests, not for images)")
    return 0


def _bench_sharding(a) -> int:
    """Per-process trained state, unsharded vs FSDP, on a digits UNet and a tiny SD UNet (full fine-tunes)."""
    import tempfile

    from .bench.memory import bench_sharding, format_sharding
    from .models import tiny

    config = str(Path(a.configs) / "ddpo_digits.yaml")
    common = ["lora.enabled=false", "train.batches_per_epoch=1", "args.minibatches=1", "sampling.num_steps=4",
              "eval.reward=null"]
    folder = a.model if a.model != "digits" else str(tiny.make_tiny_sd(Path(tempfile.mkdtemp()) / "sd", seed=0))
    name = "tiny SD 1.x UNet" if a.model == "digits" else a.model
    configs = {"digits UNet": (config, common),
               name: (config, common + [f"model={folder}", "reward=ink", "prompts=[a cat, a dog]"])}
    r = bench_sharding(configs, tuple(int(n) for n in a.processes.split(",")))
    print(json.dumps(r, indent=1))
    print(format_sharding(r))
    return 0


def _bench(a) -> int:
    what = a.what or ("suite" if a.suite else None)
    if what == "memory" and a.sharding:
        return _bench_sharding(a)
    if what == "memory":
        from .bench.memory import bench_memory, format_memory

        r = bench_memory(a.config or str(Path(a.configs) / "alignprop_digits.yaml"), grad_steps=a.steps)
        print(json.dumps(r, indent=1))
        print(format_memory(r))
        return 0
    if what == "reward":
        from .bench.reward import bench_reward, format_reward

        r = bench_reward(a.reward or "classifier", batch=a.batch, repeats=a.repeats)
        print(json.dumps(r, indent=1))
        print(format_reward(r))
        return 0
    if what == "step":
        from .bench.step import bench_step, format_step

        methods = [m.strip() for m in a.methods.split(",") if m.strip()] if a.methods else None
        r = bench_step(methods, configs=a.configs, suite=a.suite or "digits", repeats=a.repeats, out=a.out)
        print(format_step(r))
        return 0
    if what == "sampler":
        from .bench import bench_sampler

        prompts = _prompts_arg(a.prompts)
        r = bench_sampler(a.model, batch=a.batch, num_steps=a.steps, repeats=a.repeats, prompts=prompts,
                          resolution=a.resolution)
        print(json.dumps(r, indent=1))
        print(f"sampling with log-probs / diffusers {r['reference']}: {r['ratio']:.3f}x (target <= 1.15x)")
        if r["reference"] == "pipeline":  # and one training step's memory with and without the UNet's checkpointing
            from .bench.memory import bench_memory, format_memory

            extra = [f"model={a.model}", "reward=brightness",
                     f"prompts={json.dumps(prompts) if isinstance(prompts, list) else prompts or 'animals'}",
                     f"train.batch_size={a.batch}", f"sampling.num_steps={a.steps}", "args.checkpoint=false",
                     "eval.reward=null"] + ([f"pipeline.resolution={a.resolution}"] if a.resolution else [])
            m = bench_memory(str(Path(a.configs) / "alignprop_digits.yaml"), grad_steps=a.steps, extra=extra,
                             toggle="train.gradient_checkpointing")
            print(json.dumps(m, indent=1))
            print(format_memory(m))
        return 0
    from .bench import SUITES, run_bench

    if what == "tune":
        return _bench_tune(a)
    if what != "suite" or not a.suite:
        raise SystemExit(f"usage: diffalign bench --suite {'|'.join(SUITES)} [--methods a,b] [--seeds K] [--budget N] "
                         "[--out DIR] [--quick]   or   diffalign bench sampler   or   diffalign bench step")
    from .bench.report import summary_table

    methods = [m.strip() for m in a.methods.split(",") if m.strip()] if a.methods else None
    out = a.out or f"runs/bench-{a.suite}{'-quick' if a.quick else ''}"
    results = run_bench(a.suite, out, methods=methods, seeds=a.seeds, budget=a.budget, quick=a.quick,
                        per_prompt=a.per_prompt, configs=a.configs, command="diffalign " + " ".join(sys.argv[1:]),
                        overrides=a.set or [], reference=a.reference, feedback=a.feedback)
    print(summary_table(results))
    print(f"report: {Path(out) / 'report.md'}")
    return 0


def _bench_tune(a) -> int:
    from .bench.report import summary_table
    from .bench.tune import run_tune

    if not a.suite or not a.methods:
        raise SystemExit("usage: diffalign bench tune --suite SUITE --methods a,b [--trials 8] [--seeds 5] [--out DIR]")
    out = a.out or f"runs/tune-{a.suite}"
    r = run_tune(a.suite, out, [m.strip() for m in a.methods.split(",") if m.strip()], trials_per_method=a.trials,
                 seeds=a.seeds or 5, trial_seeds=a.trial_seeds, metric=a.metric, budget=a.budget,
                 per_prompt=a.per_prompt, configs=a.configs, overrides=a.set or [], spread=a.spread,
                 command="diffalign " + " ".join(sys.argv[1:]), feedback=a.feedback)
    print(summary_table(r["final"]))
    print(f"chosen: {r['tuning']['chosen']}")
    print(f"report: {Path(out) / 'final' / 'report.md'}; trials: {Path(out) / 'tune.md'}")
    return 0


def _demo(a) -> int:
    from .run_folder import holds_run, open_run
    from .train import resolve_config, train

    out = Path(a.out)
    folder = open_run(out) if holds_run(out) else None
    if folder is not None and folder.finished:
        summary = folder.summary.to_json()
        print(f"{out} already holds a finished demo run (delete it to run again):")
    elif folder is not None:  # interrupted: resume it
        summary = train(*folder.config(), out, resume=True)
    else:
        summary = train(*resolve_config(Path(a.config)), out)
    print()
    print(format_summary(summary))
    print()
    for name in ("samples/base.png", "samples/final.png", "reward_curve.png", "summary.json", "metrics.jsonl"):
        print(f"  {out / name}")
    print(f"TensorBoard: tensorboard --logdir {out / 'tb'}")
    return 0


def _label(a) -> int:
    import signal

    from .label import make_server

    # Ctrl-C (SIGINT) stops the page even when a script started it in the background, where the shell
    # leaves SIGINT ignored for the whole process tree
    signal.signal(signal.SIGINT, signal.default_int_handler)
    server = make_server(a.dir, a.host, a.port)
    fb = server.feedback
    print(f"{fb.kind} set in {fb.folder}: {len(fb.answers)} / {len(fb.items)} answered; writes {fb.output}")
    print(f"open {server.url} in a browser (Ctrl-C to stop; every answer is saved as it is given)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        print(f"\nstopped: {len(fb.answers)} / {len(fb.items)} answered")
    finally:
        server.server_close()
    return 0


def _data(a) -> int:
    from .data import feedback

    if a.what == "labels" and a.pairs:  # labels from an existing pairs set
        if a.model:
            raise ValueError("give either --pairs (labels from a pairs set) or --model (labels from new samples)")
        _print_labels(a.out, feedback.labels_from_pairs(a.pairs, a.out)[1])
        return 0
    from accelerate import PartialState

    from .data.prompts import resolve_prompts
    from .models import load_model
    from .rewards import build_reward
    from .sampler import Sampler

    device = PartialState().device  # accelerate chooses: CUDA, MPS, XPU or the CPU
    model = load_model(a.model or "digits", device=device)
    prompts = resolve_prompts(_prompts_arg(a.prompts), model.prompts)
    sampler = Sampler(num_steps=a.steps or model.num_inference_steps, eta=a.eta, guidance_scale=a.guidance)
    if a.what in ("images", "candidates"):  # unlabelled sets, for `diffalign label`
        per_prompt = a.per_prompt or (1 if a.what == "images" else 4)
        path = feedback.make_unlabelled(model, prompts, a.n, per_prompt, a.out, a.what, seed=a.seed, sampler=sampler)
        print(f"{path}: {a.n} prompts x {per_prompt} images; label them with `diffalign label {a.out}`")
        return 0
    reward = build_reward(a.reward, device=device)
    out = Path(a.out) / "pairs" if a.what == "labels" else Path(a.out)
    stats = feedback.make_pairs(model, reward, prompts, a.n, out, seed=a.seed, bt_noise=a.bt_noise, sampler=sampler)
    print(json.dumps(stats, indent=1))
    if a.what == "labels":  # the Pick-a-Pic rule on the new pairs
        _print_labels(a.out, feedback.labels_from_pairs(out / "pairs.jsonl", a.out)[1])
    return 0


def _prompts_arg(text: str | None):
    """--prompts: 'a,b' is a list; anything else a prompts file or set name (None: the default)."""
    return text.split(",") if text and "," in text else text


def _print_labels(out, counts: dict) -> None:
    print(f"{Path(out) / 'labels.jsonl'}: {counts['desirable']} desirable, {counts['undesirable']} undesirable"
          f" ({counts['ties_dropped']} tied pairs dropped)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="diffalign", description="Align diffusion models with rewards and preferences.")
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train", help="train with a YAML config, or resume a run folder")
    t.add_argument("config", nargs="?", help="YAML config (see configs/)")
    t.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key (repeatable)")
    t.add_argument("--out", help="run folder (default runs/<method>-<model>-<time>)")
    t.add_argument("--resume", metavar="DIR", help="resume the run in DIR from its newest checkpoint")
    t.set_defaults(fn=_train)
    pt = sub.add_parser("pretrain", help="pretrain and cache an embedded base model")
    pt.add_argument("model", help="a registered model (`diffalign models`)")
    pt.set_defaults(fn=_pretrain)
    for kind in ("methods", "rewards"):
        sub.add_parser(kind, help=f"list registered {kind}").set_defaults(fn=lambda a, k=kind: _list(k))
    mo = sub.add_parser("models", help="list registered models, or build a tiny random test pipeline folder")
    mo.add_argument("action", nargs="?", choices=["make-tiny-sd", "make-tiny-sd3", "make-tiny-flux", "make-tiny-clip"],
                    help="make-tiny-sd: a tiny random Stable Diffusion folder; make-tiny-sd3: a tiny random Stable "
                         "Diffusion 3 folder; make-tiny-flux: a tiny random FLUX.1 folder (load it with "
                         "pipeline.resolution: 32); make-tiny-clip: a tiny random CLIP folder (for rewards and "
                         "eval.features); none: list the models")
    mo.add_argument("out", nargs="?", help="output folder (make-tiny-*)")
    mo.add_argument("--seed", type=int, default=0)
    mo.add_argument("--no-t5", action="store_true", help="make-tiny-sd3: leave out the T5 text encoder")
    mo.add_argument("--no-guidance", action="store_true",
                    help="make-tiny-flux: no guidance embedding (FLUX.1-schnell's layout)")
    mo.set_defaults(fn=_models)
    e = sub.add_parser("eval", help="evaluate a run's aligned model against its base on fixed seeds (eval.json)")
    e.add_argument("run", help="run folder (the --out of `diffalign train`)")
    e.add_argument("--n", type=int, default=None, help="total samples (rounded up to a whole number per prompt)")
    e.add_argument("--per-prompt", type=int, default=None, help="samples per prompt (default: the run's eval.per_prompt)")
    e.add_argument("--seed", type=int, default=None, help="evaluation seed (default: the run's eval.seed)")
    e.set_defaults(fn=_eval)
    sm = sub.add_parser("sample", help="sample a finished run's aligned model (or --base): PNG grid / .npy + safetensors")
    sm.add_argument("run", help="run folder (the --out of `diffalign train`)")
    sm.add_argument("--out", required=True, help="output file: .png for images, .npy for 2-D points")
    sm.add_argument("--n", type=int, default=None, help="total samples (rounded up to a whole number per prompt)")
    sm.add_argument("--prompts", nargs="+", default=None, help="prompts (default: the run's)")
    sm.add_argument("--seed", type=int, default=0, help="noise seed (the same for --base and the aligned model)")
    sm.add_argument("--base", action="store_true", help="sample the base model instead of the aligned one")
    sm.set_defaults(fn=_sample)
    ex = sub.add_parser("export", help="write a run's aligned model as a diffusers pipeline folder (LoRA beside it, "
                        "or merged with --merge)")
    ex.add_argument("run", help="run folder (the --out of `diffalign train`) of a model loaded from a pipeline folder")
    ex.add_argument("--out", required=True, help="new output folder")
    ex.add_argument("--merge", action="store_true", help="fuse the LoRA into the UNet (from_pretrained alone loads it)")
    ex.add_argument("--base-model", default=None,
                    help="the base model's Hub id for the model card's metadata (default: the base folder's name)")
    ex.set_defaults(fn=_export)
    b = sub.add_parser("bench", help="benchmarks: --suite digits|toy2d|digits-flow|toy2d-flow (methods at equal reward budget), digits-minority (constrained training), sampler, step")
    b.add_argument("what", nargs="?", choices=["sampler", "suite", "tune", "step", "memory", "reward"],
                   help="sampler, step (one update vs bare forward+backward), memory (one AlignProp update with and "
                        "without gradient checkpointing), reward (queries/s in-process vs over HTTP), tune (each "
                        "method tuned with the same trials on a validation split, then compared on fresh seeds), or "
                        "suite (implied by --suite)")
    b.add_argument("--reward", default=None, help="(reward) the reward to serve and time (default classifier)")
    b.add_argument("--config", help="(memory) the config to measure (default configs/alignprop_digits.yaml)")
    b.add_argument("--sharding", action="store_true",
                   help="(memory) per-process parameters + gradients + AdamW state, unsharded vs train.sharding: fsdp, "
                        "on the digits UNet and a tiny SD UNet (or --model PATH)")
    b.add_argument("--processes", default="1,2", help="(memory --sharding) process counts, e.g. 1,2,4")
    b.add_argument("--suite", help="digits, toy2d, digits-flow, toy2d-flow, digits-minority or digits-rotated")
    b.add_argument("--methods", help="comma-separated methods/config names (default: the suite's)")
    b.add_argument("--seeds", type=int, default=None, help="seeds per method (default 3)")
    b.add_argument("--budget", type=int, default=None, help="reward queries per run")
    b.add_argument("--per-prompt", type=int, default=None, help="evaluation samples per prompt")
    b.add_argument("--quick", action="store_true", help="the preset that finishes in about 10 minutes")
    b.add_argument("--out", help="bench folder (default runs/bench-SUITE); rerun the command to resume")
    b.add_argument("--configs", default="configs", help="folder with <method>_<suite>.yaml configs")
    b.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="(suite) override for every cell, e.g. --set model=/models/sd15 --set prompts=animals")
    b.add_argument("--feedback", default="paired", choices=["paired", "unpaired", "imbalanced"],
                   help="(suite) the offline methods' feedback, built from base samples at the same reward budget: "
                        "paired (budget/2 pairs ranked by the reward, for every offline method), unpaired (budget "
                        "images labelled alone, desirable = above their prompt's median reward: KTO learns from the "
                        "labels, DPO from the budget/2 pairs they form) or imbalanced (the same, top quarter "
                        "desirable: budget/4 pairs)")
    b.add_argument("--reference", default=None,
                   help="(suite) a method of the bench: the report adds every other method's paired difference "
                        "to it per seed, with bootstrap intervals (tune: the first method)")
    b.add_argument("--trials", type=int, default=8, help="(tune) trials per method, the shipped config included")
    b.add_argument("--trial-seeds", type=int, default=1, help="(tune) seeds per trial")
    b.add_argument("--metric", default=None, help="(tune) what picks the trial: default eval_reward_mean "
                   "(toy2d suites: optimum_ratio, lower is better)")
    b.add_argument("--spread", type=float, default=10.0, help="(tune) trials draw each value within ×/÷ this")
    b.add_argument("--model", default="digits", help="(sampler) model")
    b.add_argument("--batch", type=int, default=64)
    b.add_argument("--prompts", default=None, help="(sampler) prompts: comma-separated, a file or a set name")
    b.add_argument("--steps", type=int, default=20, help="(sampler) sampling steps; (memory) steps with gradient")
    b.add_argument("--repeats", type=int, default=7, help="(sampler, step) timed repeats")
    b.add_argument("--resolution", type=int, default=None,
                   help="(sampler) image size of a pipeline folder (default: its own; e.g. 32 for make-tiny-flux)")
    b.set_defaults(fn=_bench)
    d = sub.add_parser("demo", help="align the digits model with DDPO and report before/after")
    d.add_argument("--out", default="runs/demo")
    d.add_argument("--config", default=str(Path("configs") / "ddpo_digits.yaml"))
    d.set_defaults(fn=_demo)
    dt = sub.add_parser("data", help="build offline feedback sets (pairs, labels) for diffusion-dpo / diffusion-kto, "
                        "or unlabelled ones (images, candidates) for `diffalign label`")
    dt.add_argument("what", choices=["pairs", "labels", "images", "candidates"],
                    help="pairs / labels: ranked by --reward; images (a KTO set) / candidates (DPO candidates): "
                         "unlabelled samples for people to label with `diffalign label`")
    dt.add_argument("--out", required=True, help="output folder (pairs.jsonl / labels.jsonl + images)")
    dt.add_argument("--model", default=None, help="model name or pipeline folder whose samples make the set "
                    "(default digits)")
    dt.add_argument("--reward", default="classifier")
    dt.add_argument("--n", type=int, default=512, help="number of pairs (images, candidates: of prompts)")
    dt.add_argument("--per-prompt", type=int, default=None, help="(images, candidates) images per prompt "
                    "(default 1 and 4)")
    dt.add_argument("--bt-noise", type=float, default=None, help="Bradley-Terry temperature (default: argmax)")
    dt.add_argument("--seed", type=int, default=0)
    dt.add_argument("--prompts", default=None, help="comma-separated prompts, a prompts file or a prompt set name "
                    "(default: the model's own; a pipeline folder has none)")
    dt.add_argument("--steps", type=int, default=None, help="sampling steps (default: the model's)")
    dt.add_argument("--eta", type=float, default=1.0, help="DDIM eta")
    dt.add_argument("--guidance", type=float, default=1.0, help="classifier-free guidance scale (1 = none)")
    dt.add_argument("--pairs", help="`data labels` from this pairs JSONL (Pick-a-Pic rule) instead of new samples")
    dt.set_defaults(fn=_data)
    lb = sub.add_parser("label", help="label a feedback set in the browser: a D3PO round, a KTO set (images.jsonl) "
                        "or DPO candidates (candidates.jsonl)")
    lb.add_argument("dir", help="the set's folder (a D3PO round DIR/epoch-NNNN, or args.labels DIR: its newest "
                    "round)")
    lb.add_argument("--host", default="127.0.0.1", help="address to listen on (default: this machine only)")
    lb.add_argument("--port", type=int, default=8765, help="port (0: any free port)")
    lb.set_defaults(fn=_label)
    rw = sub.add_parser("reward", help="serve a reward over HTTP for runs on other machines (`reward: http(url=...)`)")
    rw.add_argument("action", choices=["serve"])
    rw.add_argument("spec", help="a reward spec: a name, name(key=value, ...), module:function or a weighted sum")
    rw.add_argument("--host", default="127.0.0.1", help="address to listen on (default: this machine only; the "
                    "protocol has no authentication)")
    rw.add_argument("--port", type=int, default=8000)
    rw.add_argument("--device", default="cpu", help="where the reward runs (e.g. cuda:1)")
    rw.add_argument("--max-batch", type=int, default=256, help="images scored in one call at most")
    rw.add_argument("--max-wait-ms", type=float, default=5.0, help="how long a request waits for others to batch with")
    rw.set_defaults(fn=_reward)
    return p


def _reward(a) -> int:
    from .serve import serve

    serve(a.spec, host=a.host, port=a.port, device=a.device, max_batch=a.max_batch, max_wait_ms=a.max_wait_ms)
    return 0


def _leave_process_group() -> None:
    """Under torchrun: wait for every process, then close the group, so no process exits while another still
    talks to it (gloo aborts such a process with 'terminate called without an active exception')."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    from .data.human import LabelsNeeded
    from .rewards.remote import RewardServerDown

    args = build_parser().parse_args(argv)
    try:
        code = args.fn(args)
        _leave_process_group()
        return code
    except LabelsNeeded as e:  # not an error: the run waits for a person
        print(f"diffalign: waiting for labels: {e}", file=sys.stderr)
        return 3
    except RewardServerDown as e:  # the run stopped with its last checkpoint intact
        print(f"diffalign: stopped: {e}", file=sys.stderr)
        return 4
    except (ValueError, FileNotFoundError, FileExistsError, KeyError) as e:
        # bad input: one clear line, no traceback (set DIFFALIGN_DEBUG=1 for one)
        import os

        if os.environ.get("DIFFALIGN_DEBUG"):
            raise
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"diffalign: error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
