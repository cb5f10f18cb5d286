"""Measurements behind results/demo_llm_diagnosis.md: what the LLM demo's numbers do and do not show.

Read from the finished demo runs (``runs/demo_llm``), plus the runs the experiments below add:

* **step 0**: the pretrained backbone with NoRA applied and nothing trained yet, in each form (residual, the
  default; the paper's) and init (range fit, calibrated): perplexity on the held-out test prompts against the
  backbone's own, and the largest change of a logit;
* **does the start change the results**: NoRA and NoRA++ trained in the paper's form (the rational replaces SiLU)
  against the demo's runs in the residual form, paired by seed on the test questions;
* **outside the fit range, after training**: how far each form's activation is from SiLU at inputs beyond the range
  the base rationals were fitted on (up to the -40 / +14 a real pretrained LLM's gate inputs reach), with the
  trained NoRA updates of the demo's runs;

* **gate pre-activation range**: the inputs of every SiLU (``mlp.act_fn``) on the test prompts, in the pretrained
  model (plain SiLU), in a trained NoRA++ run with its NoRA update removed (its LoRA kept) and in the trained run:
  the share outside the fit range of the base rational, and the 0.1 / 99.9 percentiles;
* **is the NoRA part of NoRA++ used**: eval accuracy of each NoRA++ run with its NoRA update removed (LoRA kept),
  paired by seed; and how far its coefficients and curves moved;
* **NoRA++ at one learning rate**: NoRA++ runs whose NoRA factors train at the LoRA factors' lr instead of the
  swept ``nora_lr``, paired by seed on the test questions;
* **does the calibrated init matter**: NoRA with ``init=fit`` (the rational fitted to SiLU on the fit range) against
  the demo's calibrated NoRA (fitted on real gate pre-activations), paired by seed on the test questions.

    python -m nora.demo.llm --diagnose       # after python -m nora.demo.llm (make demo)
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F

from nora.adapter.config import NoraConfig
from nora.adapter.inject import apply_nora, nora_modules
from nora.app.reload import load_trained_model
from nora.demo.diagnosis import coefficient_stats, range_stats, without_update
from nora.errors import UserError
from nora.eval.mmlu import build_prompt, evaluate_mmlu
from nora.eval.mmlu_data import load_mmlu
from nora.rational.fit import ACTIVATIONS
from nora.rational.functional import rational_reference
from nora.results.collect import collect
from nora.results.demo_llm_report import demo_llm_runs
from nora.results.stats import paired_difference, summarize

NORA, NORA_PP = "nora", "nora_pp"  # the methods the diagnosis measures: the demo's runs of each, and re-runs
DIAGNOSED_METHODS = (NORA, NORA_PP)


def gate_inputs(model, tokenizer, data: Path, k: int, protocol: str, limit: int = 64) -> dict[str, torch.Tensor]:
    """The input of every ``mlp.act_fn`` on up to ``limit`` test prompts per subject (one flat tensor per layer)."""
    seen: dict[str, list[torch.Tensor]] = {}
    hooks = [
        m.register_forward_hook(
            lambda mod, inp, out, key=name: seen.setdefault(key, []).append(inp[0].detach().flatten())
        )
        for name, m in model.named_modules()
        if name.endswith("mlp.act_fn")
    ]
    try:
        with torch.no_grad():
            for subject, d in load_mmlu(data / "mmlu", subjects="all", k=k).items():
                for q in d.test[:limit]:
                    ids = tokenizer(build_prompt(subject, d.dev[:k], q, protocol), return_tensors="pt").input_ids
                    model.eval()(input_ids=ids)
    finally:
        for h in hooks:
            h.remove()
    return {_short(k): torch.cat(v) for k, v in sorted(seen.items())}


def held_out_prompts(tokenizer, data: Path, k: int, protocol: str, limit: int = 64) -> list[torch.Tensor]:
    """The token ids of up to ``limit`` test prompts per subject (questions about people and number pairs the
    backbone never saw questioned), with their answers: held-out text in the form the demo scores."""
    out = []
    for subject, d in load_mmlu(data / "mmlu", subjects="all", k=k).items():
        for q in d.test[:limit]:
            text = build_prompt(subject, d.dev[:k], q, protocol) + " " + q.choices[q.answer]
            out.append(tokenizer(text, return_tensors="pt").input_ids)
    return out


def calibration_batches(tokenizer, data: Path, n: int = 32, batch: int = 8) -> list[dict]:
    """``n`` Alpaca records of the demo's instruction data (instruction, input and response as one text), in batches:
    what a training run's ``init=calibrated`` records its gate inputs on."""
    records = json.loads((data / "alpaca.json").read_text())[:n]
    texts = ["\n".join(v for v in (r["instruction"], r.get("input", ""), r["output"]) if v) for r in records]
    return [{"input_ids": tokenizer(t, return_tensors="pt").input_ids} for t in texts]


def step0_agreement(model, reference: dict, prompts: list[torch.Tensor]) -> tuple[float, float]:
    """(perplexity over every next token of ``prompts``, largest |logit change| / largest |logit| against
    ``reference``: prompt index -> the pretrained model's logits)."""
    nll, count, worst = 0.0, 0, 0.0
    with torch.no_grad():
        for i, ids in enumerate(prompts):
            logits = model.eval()(input_ids=ids).logits[0].float()
            nll += F.cross_entropy(logits[:-1], ids[0, 1:], reduction="sum").item()
            count += ids.shape[1] - 1
            ref = reference[i]
            worst = max(worst, ((logits - ref).abs().max() / ref.abs().max()).item())
    return math.exp(nll / count), worst


def step0_section(backbone: str, data: Path, k: int, protocol: str) -> tuple[list[str], dict]:
    """Step 0 of NoRA on the pretrained backbone in every form and init (see the module docstring): the report's
    lines and ``{(residual, init): (perplexity change %, largest logit change)}``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(backbone)
    pretrained = AutoModelForCausalLM.from_pretrained(backbone).eval()
    prompts = held_out_prompts(tokenizer, data, k, protocol)
    with torch.no_grad():
        reference = {i: pretrained(input_ids=ids).logits[0].float() for i, ids in enumerate(prompts)}
    base_ppl, _ = step0_agreement(pretrained, reference, prompts)
    calibration = calibration_batches(tokenizer, data)
    tokens = sum(ids.shape[1] - 1 for ids in prompts)
    lines = [
        "## Step 0: does NoRA start at the pretrained model?",
        "",
        f"The pretrained backbone with NoRA applied and nothing trained yet, on {len(prompts)} held-out test "
        f"prompts with their answers ({tokens} next tokens): perplexity {base_ppl:.4f} without NoRA. "
        "Calibrated init: each layer's rational fitted over its gate inputs on 32 of the demo's instruction "
        "records (as a training run's `init=calibrated` does on its first batches).",
        "",
        "| form | init | perplexity | change | largest logit change (relative) |",
        "|---|---|---|---|---|",
    ]
    results = {}
    for residual in (True, False):
        for init in ("fit", "calibrated"):
            model = copy.deepcopy(pretrained)
            apply_nora(
                model,
                NoraConfig(residual=residual, init=init),
                calibration_batches=calibration if init == "calibrated" else None,
            )
            ppl, worst = step0_agreement(model, reference, prompts)
            change = 100 * (ppl / base_ppl - 1)
            results[(residual, init)] = (change, worst)
            form = "residual (default)" if residual else "paper's"
            lines.append(f"| {form} | {init} | {ppl:.4f} | {change:+.4f}% | {worst:.2e} |")
    lines.append("")
    return lines, results


OUTSIDE_POINTS = (-40.0, -20.0, -10.0, -6.0, -3.0, 3.0, 6.0, 10.0, 14.0)


def outside_range(models: list) -> dict[float, tuple[float, float, float]]:
    """For the NoRA activations of ``models`` (trained): per input x of :data:`OUTSIDE_POINTS`, the largest over
    layers, groups and models of |R_base(x) - phi(x)| (the paper's form at step 0), |R(x) - R_base(x)| (the residual
    form's distance to phi after training: the change the update made) and |R(x) - phi(x)| (the paper's form after
    training)."""
    x = torch.tensor(OUTSIDE_POINTS, dtype=torch.float64)
    out = {float(v): (0.0, 0.0, 0.0) for v in OUTSIDE_POINTS}
    for model in models:
        for mod in nora_modules(model).values():
            with torch.no_grad():
                num, den = (t.detach().double() for t in mod.coefficients())
                bnum, bden = mod.base_numerator.double().expand_as(num), mod.base_denominator.double()
                grid = x[:, None].expand(-1, num.shape[0]).contiguous()
                y, base = rational_reference(grid, num, den, mod.form), rational_reference(grid, bnum, bden, mod.form)
                phi = ACTIVATIONS[mod.original](x)[:, None]
            for i, v in enumerate(OUTSIDE_POINTS):
                old = out[float(v)]
                out[float(v)] = (
                    max(old[0], (base[i] - phi[i]).abs().max().item()),
                    max(old[1], (y[i] - base[i]).abs().max().item()),
                    max(old[2], (y[i] - phi[i]).abs().max().item()),
                )
    return out


def _short(name: str) -> str:
    return name[name.index("layers") :] if "layers" in name else name


def accuracy(model, tokenizer, data: Path, eval_conf: dict) -> float:
    r = evaluate_mmlu(
        model,
        tokenizer,
        data / "mmlu",
        subjects="all",
        k=eval_conf["k"],
        protocol=eval_conf["protocol"],
        batch_size=eval_conf["batch_size"],
        progress=False,
    )
    return 100 * r.accuracy


def diagnosis_runs(conf: dict, out_root: Path) -> tuple[list, list, list]:
    """The demo's scored runs under ``out_root``, its NoRA runs and its NoRA++ runs (by seed); a
    :class:`UserError` saying which of the two is missing (nothing is measured or written then)."""
    runs = demo_llm_runs(collect(out_root), conf["seeds"])
    pp = sorted((r for r in runs if r.method == NORA_PP), key=lambda r: r.seed)
    nora = sorted((r for r in runs if r.method == NORA), key=lambda r: r.seed)
    if not pp or not nora:
        found = sorted({r.method for r in runs})
        missing = [label for label, rs in (("NoRA (nora)", nora), ("NoRA++ (nora_pp)", pp)) if not rs]
        raise UserError(
            f"the diagnosis needs scored NoRA and NoRA++ runs under {out_root}; there are no "
            f"{' and no '.join(missing)} runs (found: {', '.join(found) or 'none'}): run `python -m "
            f"nora.demo.llm` (its default methods include both) first; the diagnosis file was not "
            "written"
        )
    return runs, nora, pp


def diagnose(conf: dict, data: Path, out_root: Path, common: dict, n_procs: int, run_jobs, job, lrs: dict) -> str:
    """Measure and return the markdown report; the runs it adds are ``job(dict(common, method=..., ...))`` run by
    ``run_jobs`` (the demo's own runner and job, :mod:`nora.demo.llm`); ``lrs``: the demo's learning rates per
    method (configs/demo/learning_rates_llm.yaml's ``methods``)."""
    runs, nora, pp = diagnosis_runs(conf, out_root)
    ev = conf["eval"]
    lines = [
        "# LLM demo diagnosis: what the numbers do and do not show",
        "",
        "Written by `python -m nora.demo.llm --diagnose` from the runs of `make demo` (`runs/demo_llm`) and the "
        "init experiment's (`runs/demo_llm_diagnosis`). **Offline demo on a generated world, not MMLU.**",
        "",
    ]
    summary: list[str] = []  # one line per measurement below, inserted after this header
    pp_lrs = dict(lrs[NORA_PP])

    # 0. what the table can resolve
    n = {c: int(v["n"]) for c, v in pp[0].mmlu["categories"].items()}
    n_all = int(pp[0].mmlu["overall"]["n"])
    by_method = {}
    for r in runs:
        by_method.setdefault(r.method, []).append(r)
    p = sum(r.mmlu["overall"]["accuracy"] for r in runs) / len(runs)
    lines += [
        "## What the table can resolve",
        "",
        f"The test split has {n_all} questions ({', '.join(f'{c}: {k}' for c, k in n.items())}). One accuracy "
        f"near the runs' mean ({100 * p:.0f}%) on {n_all} questions has a binomial standard error of "
        f"{100 * (p * (1 - p) / n_all) ** 0.5:.1f} points ({100 * (p * (1 - p) / min(n.values())) ** 0.5:.1f} "
        "on the smaller category); seeds share the questions, so the paired intervals of the report are the "
        "comparison to read. Category means over seeds (chance: 25%):",
        "",
        "| method | " + " | ".join(n) + " |",
        "|---|" + "---|" * len(n),
    ]
    for m, rs in by_method.items():
        cells = [summarize([100 * r.mmlu["categories"][c]["accuracy"] for r in rs]).fmt(1) for c in n]
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    lines.append("")
    acc = {m: {r.seed: 100 * r.mmlu["overall"]["accuracy"] for r in rs} for m, rs in by_method.items()}
    base_file = Path(out_root) / "base" / "mmlu.json"
    if base_file.exists():
        base_acc = 100 * json.loads(base_file.read_text())["overall"]["accuracy"]
        delta = {m: sum(v.values()) / len(v) - base_acc for m, v in acc.items()}
        best = max(delta, key=delta.get)
        summary.append(
            f"- The base model answers {base_acc:.1f}% of the test questions (chance 25%). After "
            "instruction tuning, mean change per method: "
            + ", ".join(f"{m} {d:+.1f}" for m, d in sorted(delta.items(), key=lambda kv: -kv[1]))
            + f" points; {sum(d > 0 for d in delta.values())} of {len(delta)} methods gain on average "
            f"(best: {best})."
        )
        if delta[best] <= 0:
            summary.append(
                "- What that does not show: no method improves on the base model, so this demo cannot "
                "test the paper's claim that NoRA++ adds to LoRA's gain; it compares what each method "
                "costs a model that already answers in MMLU's form."
            )
    if "lora" in acc:
        summary.append(
            f"- NoRA++ − LoRA, paired by seed: {paired_difference(acc['nora_pp'], acc['lora']).fmt(1)} points."
        )

    # step 0, in every form and init
    step0_lines, step0 = step0_section(common["backbone"], data, ev["k"], ev["protocol"])
    lines += step0_lines
    summary.append(
        "- Step 0 (nothing trained) on held-out test prompts: perplexity change against the pretrained "
        "backbone "
        + ", ".join(
            f"{'residual' if r else 'paper'} form {i} {step0[(r, i)][0]:+.4f}%"
            for r in (True, False)
            for i in ("fit", "calibrated")
        )
        + "."
    )

    # 1. ranges
    from transformers import AutoModelForCausalLM, AutoTokenizer

    first = load_trained_model(pp[0].dir)
    fit = tuple(next(iter(nora_modules(first.model).values())).fit_range or (-3.0, 3.0))
    pretrained = AutoModelForCausalLM.from_pretrained(common["backbone"])
    silu_in = gate_inputs(pretrained, AutoTokenizer.from_pretrained(common["backbone"]), data, ev["k"], ev["protocol"])
    del pretrained
    trained = gate_inputs(first.model, first.tokenizer, data, ev["k"], ev["protocol"])
    with without_update(first.model, "all"):
        base_in = gate_inputs(first.model, first.tokenizer, data, ev["k"], ev["protocol"])
    outside = summarize([range_stats(t, fit)["outside"] for t in silu_in.values()])
    summary.append(
        f"- In the pretrained model, {outside.fmt(1)}% of the gate pre-activations (per layer, test "
        f"prompts) lie outside the fit range [{fit[0]:g}, {fit[1]:g}]."
    )
    lines += [
        "## Gate pre-activations (inputs of the SiLU each rational replaces), test prompts",
        "",
        f'Fit range of the base rationals: [{fit[0]:g}, {fit[1]:g}]. "pretrained": the backbone itself '
        f'(plain SiLU, no tuning); "LoRA kept": the NoRA++ run of seed {pp[0].seed} with its NoRA update '
        'removed (LoRA-tuned pre-activations through the base rationals); "trained": that run as trained.',
        "",
        "| layer | outside fit range, pretrained (%) | LoRA kept (%) | trained (%) | 0.1 / 99.9 percentile, "
        "pretrained | 0.1 / 99.9 percentile, trained | max abs, trained |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, t in trained.items():
        z, b, a = range_stats(silu_in[name], fit), range_stats(base_in[name], fit), range_stats(t, fit)
        lines.append(
            f"| {name} | {z['outside']:.2f} | {b['outside']:.2f} | {a['outside']:.2f} | "
            f"{z['p001']:.2f} / {z['p999']:.2f} | {a['p001']:.2f} / {a['p999']:.2f} | {a['absmax']:.2f} |"
        )

    # 2. the NoRA part of NoRA++
    full, ablated = {}, {}
    stats = {}
    for r in pp:
        t = load_trained_model(r.dir)
        full[r.seed] = accuracy(t.model, t.tokenizer, data, ev)
        with without_update(t.model, "all"):
            ablated[r.seed] = accuracy(t.model, t.tokenizer, data, ev)
        stats[r.seed] = coefficient_stats(t.model)
    d = paired_difference(full, ablated)
    summary.append(
        f"- Removing NoRA++'s NoRA update changes its accuracy by {d.fmt(1)} points (its swept nora_lr: "
        f"{pp_lrs['nora_lr']:g})."
    )
    rel = summarize([v["num_rel"] for s in stats.values() for v in s.values()])
    dev = summarize([v["max_dev_fit"] for s in stats.values() for v in s.values()])
    lines += [
        "",
        "## Is the NoRA part of NoRA++ used?",
        "",
        "| seed | NoRA++ (%) | NoRA update removed, LoRA kept (%) |",
        "|---|---|---|",
    ]
    lines += [f"| {s} | {full[s]:.1f} | {ablated[s]:.1f} |" for s in sorted(full)]
    lines += [
        "",
        f"NoRA++ − (NoRA++ without its NoRA update): {d.fmt(1)} points. Relative numerator change "
        f"‖ΔP‖/‖P‖ over layers and seeds: {rel.fmt(3)}; largest deviation of a learnt curve from the base "
        f"rational inside the fit range: {dev.fmt(3)}.",
    ]

    # 3. runs the diagnosis adds (test split, the demo's seeds): NoRA with init=fit; NoRA++ with its NoRA factors
    # at its LoRA factors' learning rate instead of the swept nora_lr
    shared = dict(pp_lrs, nora_lr=pp_lrs["lr"])
    jobs = [
        dict(common, method=NORA, seed=r.seed, name=f"nora_fit_s{r.seed}", extra=("method.nora.init=fit",))
        for r in nora
    ]
    jobs += [dict(common, method=NORA_PP, seed=r.seed, name=f"nora_pp_shared_lr_s{r.seed}", lrs=shared) for r in pp]
    # the paper's form: the same runs with the rational in place of SiLU
    jobs += [
        dict(
            common,
            method=r.method,
            seed=r.seed,
            name=f"{r.method}_paper_form_s{r.seed}",
            extra=("nora_residual=false",),
        )
        for r in nora + pp
    ]
    done = run_jobs(jobs, n_procs, run=job)
    kind = {id(r): r["job"]["name"].rsplit("_s", 1)[0] for r in done}
    fit_acc = {r["job"]["seed"]: r["accuracy"] for r in done if kind[id(r)] == "nora_fit"}
    shared_acc = {r["job"]["seed"]: r["accuracy"] for r in done if kind[id(r)] == "nora_pp_shared_lr"}
    paper_acc = {
        m: {r["job"]["seed"]: r["accuracy"] for r in done if kind[id(r)] == f"{m}_paper_form"}
        for m in DIAGNOSED_METHODS
    }
    pp_acc = acc[NORA_PP]
    d = paired_difference(shared_acc, pp_acc)
    lines += [
        "",
        f"NoRA++ with its NoRA factors at its LoRA factors' learning rate (nora_lr = lr = {pp_lrs['lr']:g}, "
        f"instead of the swept nora_lr = {pp_lrs['nora_lr']:g}), test split:",
        "",
        "| seed | NoRA++, swept nora_lr (the demo's) (%) | NoRA++, nora_lr = lr (%) |",
        "|---|---|---|",
    ]
    lines += [f"| {s} | {pp_acc[s]:.1f} | {shared_acc.get(s, float('nan')):.1f} |" for s in sorted(pp_acc)]
    lines += ["", f"(nora_lr = lr) − (swept nora_lr): {d.fmt(1)} points."]
    summary.append(
        f"- NoRA++ with its NoRA factors at its LoRA factors' lr ({pp_lrs['lr']:g}): {d.fmt(1)} points "
        "against the swept nora_lr."
    )

    trained_nora = [load_trained_model(r.dir).model for r in nora]
    curves = [coefficient_stats(m) for m in trained_nora]
    far = outside_range(trained_nora)
    lines += [
        "",
        "## Outside the fit range, after training",
        "",
        f"NoRA's trained updates ({len(nora)} runs, lr {lrs['nora']['lr']:g}; base rationals fitted over each "
        "layer's inputs on the first training batches, `init=calibrated`), evaluated from inside the range the "
        "layers' inputs reach (see the percentiles above) out to the -40 / +14 a real pretrained LLM's gate "
        "inputs reach. Largest over layers, groups and runs of: the paper's "
        "form's distance to SiLU at step 0 |R_base − SiLU|, the residual form's after training |R − R_base| "
        "(the change the update made, added to SiLU itself), the paper's form's after training |R − SiLU|.",
        "",
        "| x | SiLU(x) | paper's form, step 0 | residual form, trained | paper's form, trained |",
        "|---|---|---|---|---|",
    ]
    lines += [
        f"| {v:g} | {ACTIVATIONS['silu'](torch.tensor(v)).item():.3g} | {a:.3g} | {b:.3g} | {c:.3g} |"
        for v, (a, b, c) in far.items()
    ]
    nrel = summarize([v["num_rel"] for c in curves for v in c.values()])
    ndev = summarize([v["max_dev_fit"] for c in curves for v in c.values()])
    lines += [
        "",
        f"How far NoRA's own curves moved (lr = {lrs['nora']['lr']:g}, its {len(nora)} runs): relative "
        f"numerator change ‖ΔP‖/‖P‖ {nrel.fmt(3)}; largest deviation of a learnt curve from the base rational "
        f"inside the fit range {ndev.fmt(3)} (SiLU(3) = 2.86): a change d of the x^5 coefficient moves the "
        "curve at |x| = 3 by 243 d, so a small relative change of the coefficients is a large one of the "
        "curve near the edges of the range.",
    ]

    cal_acc = acc[NORA]
    d = paired_difference(cal_acc, fit_acc)
    lines += [
        "",
        "## Does the calibrated init matter?",
        "",
        "| seed | NoRA, calibrated init (the demo's) (%) | NoRA, init=fit (%) |",
        "|---|---|---|",
    ]
    lines += [f"| {s} | {cal_acc[s]:.1f} | {fit_acc.get(s, float('nan')):.1f} |" for s in sorted(cal_acc)]
    lines += ["", f"Calibrated − fit: {d.fmt(1)} points (same learning rate, seeds and data)."]
    summary.append(
        f"- NoRA's learnt curves move by up to {ndev.fmt(2)} inside the fit range; calibrated − fit init: "
        f"{d.fmt(1)} points."
    )
    summary.append(
        f"- Outside the fit range, after training: at x = -40 the residual form is {far[-40.0][1]:.3g} from "
        f"SiLU, the paper's form {far[-40.0][2]:.3g}; at x = 14, {far[14.0][1]:.3g} and {far[14.0][2]:.3g}."
    )
    lines += [
        "",
        "## Does the start change the results? The residual form (the demo's) against the paper's",
        "",
        "The demo's NoRA and NoRA++ runs (residual form: SiLU plus the change of its fitted rational, step 0 = "
        "the backbone) against the same runs in the paper's form (the rational in place of SiLU), same "
        "learning rates, seeds, data and init; test split.",
        "",
        "| method | seed | residual (the demo's) (%) | paper's form (%) |",
        "|---|---|---|---|",
    ]
    for m in DIAGNOSED_METHODS:
        lines += [f"| {m} | {s} | {acc[m][s]:.1f} | {paper_acc[m].get(s, float('nan')):.1f} |" for s in sorted(acc[m])]
    diffs = {m: paired_difference(acc[m], paper_acc[m]) for m in DIAGNOSED_METHODS}
    lines += [
        "",
        "Residual − paper's form, paired by seed: "
        + "; ".join(f"{m} {d.fmt(1)} points" for m, d in diffs.items())
        + ".",
    ]
    summary.append(
        "- Residual form (the default) − the paper's form, trained, paired by seed: "
        + "; ".join(f"{m} {d.fmt(1)}" for m, d in diffs.items())
        + " points."
    )
    lines[4:4] = ["## Summary (every number measured below)", "", *summary, ""]
    return "\n".join(lines) + "\n"
