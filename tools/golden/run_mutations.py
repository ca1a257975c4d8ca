r"""Apply one-line porting bugs to a COPY of the package and record which tests catch each.

Each mutation edits ``gsnet_deploy`` copied under ``--work`` (never the checkout: other people
run tests from it), then runs the checkout's tests from the copy's folder (first on ``sys.path``,
so the copy shadows the editable install; checked before each run). Results (the failing test ids per mutation) go to a JSON file;
``tests/model/MUTATIONS.md`` is written from it by hand.

    flock /tmp/gsnet-heavy.lock .venv/bin/python tools/golden/run_mutations.py --work /tmp/mut \\
        --out /tmp/mut/results.json [--only dino_eps,taps] [--fast-only]

The golden test (``tests/model/test_golden.py``, full-size model) needs several GB of RAM: run the
script under the heavy-job lock.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
FAST = ["tests/model/test_mapping.py", "tests/model/test_blocks.py", "tests/runtime/test_vocab.py"]
GOLDEN = ["tests/model/test_golden.py"]


@dataclass(frozen=True)
class Mutation:
    """A porting bug: exact (old, new) text replacements in one file of the package."""

    name: str
    path: str  # relative to gsnet_deploy/
    edits: tuple[tuple[str, str], ...]
    what: str
    head: bool = False  # the bug is in the head or the text path: the golden run may reuse cached encoder features


M = Mutation
MUTATIONS = [
    M("baseline", "model/gsnet.py", (), "no mutation: failures here are not caused by a mutation", head=True),
    M("dino_eps", "model/dino.py", (("norm_eps: float = 1e-6", "norm_eps: float = 1e-5"),), "DINO LayerNorm eps 1e-6 -> 1e-5"),
    M(
        "dino_taps",
        "model/dino.py",
        (("feature_layers: tuple[int, int, int] = (3, 7, 11)", "feature_layers: tuple[int, int, int] = (2, 6, 11)"),),
        "DINO taps (3, 7, 11) -> (2, 6, 11)",
    ),
    M(
        "qgff_swap",
        "model/checkpoint.py",
        (
            ('r"qgff.clip_embed.\\g<1>"', "@@A@@"),
            ('r"qgff.dino_embed.\\g<1>"', 'r"qgff.clip_embed.\\g<1>"'),
            ("@@A@@", 'r"qgff.dino_embed.\\g<1>"'),
        ),
        "checkpoint mapping of QGFF conv1/conv2 swapped",
        head=True,
    ),
    M(
        "swin_shift",
        "model/aggregator.py",
        (("shift=cfg.window_size // 2", "shift=cfg.window_size // 3"),),
        "Swin shift w/2 -> w/3",
        head=True,
    ),
    M(
        "clip_mean",
        "model/gsnet.py",
        (("CLIP_MEAN = (122.7709383, 116.7460125, 104.09373615)", "CLIP_MEAN = (123.675, 116.28, 103.53)"),),
        "ImageNet mean instead of CLIP's",
    ),
    M(
        "class_attn_align_corners",
        "model/aggregator.py",
        (
            (
                'out = F.interpolate(out, size=(h, w), mode="bilinear", align_corners=True)\n        return x + out',
                'out = F.interpolate(out, size=(h, w), mode="bilinear", align_corners=False)\n        return x + out',
            ),
        ),
        "class-transformer upsample align_corners True -> False",
        head=True,
    ),
    M(
        "clip_pos_bilinear",
        "model/clip.py",
        (('mode="bicubic", align_corners=False', 'mode="bilinear", align_corners=False'),),
        "CLIP positional grid resized bilinear instead of bicubic",
    ),
    M(
        "dino_pos_size",
        "model/dino.py",
        (("pos_scale: float = 1.717857142857143", "pos_scale: float = 48 / 28"),),
        "DINO pos-embed scale 48/28 instead of 48.1/28",
    ),
    M(
        "groupnorm_groups",
        "model/ripd.py",
        (("groups = out_dim // group_size", "groups = out_dim // 8"),),
        "GroupNorm with 8 channels per group instead of 16",
        head=True,
    ),
    M(
        "dense_residual",
        "model/clip.py",
        (("v = attn.out_proj(v) + x[:, :1]", "v = attn.out_proj(v) + x"),),
        "dense CLIP block: residual of every token instead of the CLS input",
    ),
    M(
        "padding_dropped",
        "model/aggregator.py",
        (("* (self.pad_len - n), min=0.0)", "* (self.pad_len - n), min=0.0) * 0.0"),),
        "class-transformer padding tokens dropped",
        head=True,
    ),
    M(
        "template_cfg",
        "model/gsnet.py",
        (('template: str = "A photo of a {} in the scene"', 'template: str = "a photo of a {}."'),),
        "model's prompt template changed",
        head=True,
    ),
    M(
        "template_vocab",
        "runtime/vocab.py",
        (('DEFAULT_TEMPLATE = "A photo of a {} in the scene"', 'DEFAULT_TEMPLATE = "A photo of a {}."'),),
        "runtime's default prompt template changed",
        head=True,
    ),
    M(
        "synonym_last",
        "runtime/vocab.py",
        (("name.split(SYNONYM_SEPARATOR)[0]", "name.split(SYNONYM_SEPARATOR)[-1]"),),
        "synonym rule: last part instead of first",
        head=True,
    ),
    M(
        "clip_taps",
        "model/clip.py",
        (("guidance_layers: tuple[int, int] = (3, 7)", "guidance_layers: tuple[int, int] = (2, 6)"),),
        "CLIP taps (3, 7) -> (2, 6)",
    ),
    M("dino_no_norm", "model/dino.py", (("y = self.norm(x[:, 1:])", "y = x[:, 1:]"),), "DINO taps without the final norm"),
    M(
        "guidance_norm_skipped",
        "model/aggregator.py",
        (("g = self.guidance_norm(guidance)", "g = guidance"),),
        "Swin appearance guidance not LayerNorm-ed",
        head=True,
    ),
    M(
        "qgff_residual",
        "model/qgff.py",
        (("z_g = z[:, : self.clip_embed.out_channels]", "z_g = z[:, self.clip_embed.out_channels :]"),),
        "QGFF residual Z_S instead of Z_G",
        head=True,
    ),
    M(
        "ripd_guidance_order",
        "model/ripd.py",
        (("torch.cat([up(x), cg, dg], dim=1)", "torch.cat([up(x), dg, cg], dim=1)"),),
        "RIPD concatenates DINO guidance before CLIP's",
        head=True,
    ),
    M(
        "qkv_order",
        "model/checkpoint.py",
        (('torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)', 'torch.cat([parts["k"], parts["q"], parts["v"]], dim=0)'),),
        "split CLIP q/k weights fused in the wrong order",
    ),
    M(
        "swin_blocks_swapped",
        "model/checkpoint.py",
        (
            ("swin_block\\.block_1\\.(.+)", "@@B@@"),
            ("swin_block\\.block_2\\.(.+)", "swin_block\\.block_1\\.(.+)"),
            ("@@B@@", "swin_block\\.block_2\\.(.+)"),
        ),
        "checkpoint mapping of Swin block_1/block_2 swapped",
        head=True,
    ),
    M(
        "linear_attn_eps",
        "model/aggregator.py",
        (("linear_attn_eps: float = 1e-6", "linear_attn_eps: float = 1e-5"),),
        "linear-attention eps 1e-6 -> 1e-5",
        head=True,
    ),
    M(
        "global_view_from_canvas",
        "runtime/protocol.py",
        (
            (
                "global_view = resize_bilinear(chw, (VIEW_SIZE, VIEW_SIZE))",
                "global_view = resize_bilinear(canvas, (VIEW_SIZE, VIEW_SIZE))",
            ),
        ),
        "global view cut from the 640x640 canvas instead of the shortest-edge image",
    ),
]


def apply(mutation: Mutation, work: Path) -> Path:
    """Copy the package under ``work/<name>`` and apply the edits; returns the PYTHONPATH entry."""
    root = work / mutation.name
    shutil.rmtree(root, ignore_errors=True)
    shutil.copytree(ROOT / "gsnet_deploy", root / "gsnet_deploy", ignore=shutil.ignore_patterns("__pycache__"))
    path = root / "gsnet_deploy" / mutation.path
    text = path.read_text()
    for old, new in mutation.edits:
        if text.count(old) != 1:
            raise SystemExit(f"{mutation.name}: {old!r} occurs {text.count(old)} times in {mutation.path}")
        text = text.replace(old, new)
    path.write_text(text)
    return root


def failing(root: Path, tests: list[str], work: Path, cache: Path | None = None) -> tuple[list[str], str]:
    """Run pytest on ``tests`` with the mutated copy first on the path; failing test ids and a summary line."""
    env = dict(os.environ, PYTHONPATH=str(root))
    if cache is not None:
        env["GSNET_GOLDEN_ENCODER_CACHE"] = str(cache)
    which = subprocess.run(
        [sys.executable, "-c", "import gsnet_deploy; print(gsnet_deploy.__file__)"],
        env=env,
        capture_output=True,
        text=True,
        cwd=root,
    )
    if not which.stdout.strip().startswith(str(root)):
        raise SystemExit(f"the mutated copy is not the one imported: {which.stdout} {which.stderr}")
    xml = work / f"{root.name}.xml"
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--rootdir={ROOT}", f"--junitxml={xml}"]
        + [t if t.startswith("-") or t == "not slow" else str(ROOT / t) for t in tests],
        env=env,
        capture_output=True,
        text=True,
        cwd=root,
    )
    ids = []
    for case in ET.parse(xml).getroot().iter("testcase"):
        if case.find("failure") is not None or case.find("error") is not None:
            ids.append(f"{case.get('classname', '').rsplit('.', 1)[-1]}::{case.get('name')}")
    return ids, proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else proc.stderr[-300:]


def main() -> int:
    """Run the mutations and write the JSON results."""
    parser = argparse.ArgumentParser(description="mutation testing of the GSNet port")
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--only", default="", help="comma-separated mutation names")
    parser.add_argument("--fast-only", action="store_true", help="skip the full-size golden test")
    parser.add_argument("--golden-only", action="store_true", help="skip the fast tests")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    chosen = [m for m in MUTATIONS if not args.only or m.name in args.only.split(",")]
    results = json.loads(args.out.read_text()) if args.out.exists() else {}
    for mutation in chosen:
        root = apply(mutation, args.work)
        entry = {"what": mutation.what, "file": mutation.path}
        if not args.golden_only:
            entry["fast"], entry["fast_summary"] = failing(root, ["-m", "not slow", *FAST], args.work)
        if not args.fast_only:
            # the baseline writes the encoder cache; head-only mutations reuse it, the others re-run the backbones
            cache = args.work / "encoder_features.pt" if mutation.head else None
            entry["golden"], entry["golden_summary"] = failing(root, GOLDEN, args.work, cache)
            entry["golden_encoder"] = "cached" if mutation.head else "recomputed"
        results[mutation.name] = {**results.get(mutation.name, {}), **entry}
        args.out.write_text(json.dumps(results, indent=1))
        print(mutation.name, entry.get("fast_summary"), entry.get("golden_summary", ""), flush=True)
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
