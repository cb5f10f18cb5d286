"""How closely each way out of nora reproduces the trained model: ONNX (onnxruntime), torch.export (as exported, and
decomposed to aten ops), and the merged causal LM loaded by transformers with nora's modeling file.

The models are those of tests/test_deploy.py (the heavy-tailed stress LLaMA and ViT of tests/heavy_tails.py, trained
three steps), every form and method, unmerged and merged; the numbers are relative max differences of the outputs
against eager PyTorch with nora's default backend on the same inputs. Writes results/deploy_agreement.json (README's
Deploy section quotes it).

    .venv/bin/python scripts/deploy_agreement.py [--out results/deploy_agreement.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

import onnxruntime as ort  # noqa: E402
import torch  # noqa: E402
from heavy_tails import stress_llama, stress_vit  # noqa: E402
from test_deploy import CASES, _as_module, rel_diff, trained  # noqa: E402

import nora  # noqa: E402
from nora.adapter.merged import rational_modules  # noqa: E402
from nora.kernels import reference_decompositions  # noqa: E402
from nora.logs import setup_logging  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(ROOT / "results" / "deploy_agreement.json"))
    args = parser.parse_args()
    llama, vit = stress_llama()[:2], stress_vit()[:2]
    rows = []
    started = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        for kind, method, residual in CASES:
            model, merged, x = trained(kind, method, residual, llama, vit)
            for state, m in (("unmerged", model), ("merged", merged)):
                module = _as_module(m, kind)
                with torch.no_grad():
                    want = module(x)
                path = Path(tmp, f"{kind}-{method}-{residual}-{state}.onnx")
                torch.onnx.export(module, (x,), dynamo=True).save(str(path))
                session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
                onnx_out = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
                program = torch.export.export(module, (x,))
                with torch.no_grad():
                    exported = program.module()(x)
                    decomposed = program.run_decompositions(reference_decompositions()).module()(x)
                row = {
                    "model": kind,
                    "method": method,
                    "form": "residual" if residual else "paper",
                    "state": state,
                    "onnxruntime_rel": rel_diff(onnx_out, want.numpy()),
                    "torch_export_rel": rel_diff(exported, want),
                    "torch_export_aten_rel": rel_diff(decomposed, want),
                }
                if kind == "llama" and state == "merged":
                    folder = Path(tmp, path.stem)
                    nora.save_merged(m, folder)
                    loaded = nora.from_pretrained(folder)
                    for r in rational_modules(loaded).values():
                        r.backend = "reference"  # the math of modeling_nora.py (tests/test_deploy.py: identical)
                    with torch.no_grad():
                        row["merged_folder_rel"] = rel_diff(loaded(input_ids=x, use_cache=False).logits, want)
                rows.append(row)
                print(json.dumps(row), flush=True)
    worst = {
        k: max(r[k] for r in rows if k in r)
        for k in ("onnxruntime_rel", "torch_export_rel", "torch_export_aten_rel", "merged_folder_rel")
    }
    out = {
        "command": "python scripts/deploy_agreement.py",
        "torch": torch.__version__,
        "onnxruntime": ort.__version__,
        "elapsed_s": round(time.time() - started, 1),
        "worst": worst,
        "rows": rows,
    }
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    print("worst:", json.dumps(worst))
    return 0


if __name__ == "__main__":
    setup_logging()
    sys.exit(main())
