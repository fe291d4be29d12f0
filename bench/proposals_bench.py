"""Proposal generators on phantom scans with exact masks: recall per structure kind, count, time.

    python bench/proposals_bench.py [--images N] [--size S] [--grid-images M] [--seed K] [--real DIR]
                                    [--real-grid-images M] [--threads T] [--methods boxes,grid,...] [--boxes JSON]

Methods, all on the same textured phantom images (split "test", which has the most lesions and
cysts), at the 256-px working size, and with ``--real DIR`` once more on ``--images`` evenly spaced
slices of the real-image benchmark that ``bench/real_scans.py`` builds (real MRI, atlas masks):

- ``boxes``: the box-prompt generator (``a3tune.labels.box_proposals``) with LiteMedSAM's real
  weights, through ``generate_proposals`` with ``BOX_GENERATOR_DEFAULTS`` (reference filters with
  ``min_side`` 8) and the box parameters given with ``--boxes`` (e.g. ``'{"grid_side": 32}'``).
- ``candidates``: its model-free candidate regions alone, exactly the set it prompts (after box NMS).
- ``classes``: a second model-free baseline, the connected components of multi-level intensity
  classes (3 and 4 Otsu classes, opened with discs of radius 0 / 2 / 4; ``bench/intensity_classes.py``),
  uncapped, on the same denoised image.
- ``box grid``: LiteMedSAM on a dense grid of boxes (32/64/128/224 px, stride half a box; 284
  prompts), kept at predicted IoU >= 0.5 and stability >= 0.5, as measured in ../shared/STACK.md.
  It costs ~0.1 s per prompt, so it runs on the first ``--grid-images`` phantom images only (real
  slices: ``--real-grid-images``, default all, so that it is compared on the same slices).
- ``points``: segment_anything's point-grid generator with the reference parameters, on the tiny
  original-SAM-architecture model (random weights: it shows the path and its cost, not quality), and
  once more with its quality thresholds off.
- ``grid25``: a bound, not a generator: per image and structure level, the ``max_proposals`` (25) of
  the box grid's masks that a greedy choice with the labels picks (largest gain in summed best Dice
  first); the grid's masks are computed once, by whichever of the two rows runs first (the table
  lists the grid first, so this row's time is the choice alone). Where it falls below the grid,
  no generator that keeps 25 such masks can reach the grid.
- ``oracle``: a reference, not a generator: LiteMedSAM prompted with each true structure's tight box
  (one prompt per structure, single-mask output).

For each structure the best proposal's IoU is taken (and its Dice, 2 IoU / (1 + IoU)); the table
gives the share of structures at IoU >= 0.5 / >= 0.75 and the mean best Dice per kind (phantom:
body / organ / lesion, cysts counted as lesions / all = those three; spine and cue marker are
reported as "other" and are not in "all"; real slices: the builder's kinds, all = every kind, one
table per structure level: anatomy, then parcels; the methods run once per slice for both),
proposals per image and wall seconds per image with ``torch.set_num_threads(--threads)``. The machine load is printed too: on a
shared machine wall time grows with it, so the CPU seconds of this process are given alongside.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

# Idle OpenMP threads sleep instead of spinning: on a shared machine, spinning threads that wait for
# a descheduled peer made 2-thread runs 4-5x slower than 1-thread runs (measured); must precede torch.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import cv2  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from intensity_classes import class_components  # noqa: E402
from real_scans import LEVELS, load_slices  # noqa: E402

from a3tune.data.phantom import PhantomConfig, draw, plan_split  # noqa: E402
from a3tune.labels import box_proposals as bx  # noqa: E402
from a3tune.labels.mask_ops import mask_iou_matrix  # noqa: E402
from a3tune.labels.proposal_params import ProposalParams  # noqa: E402
from a3tune.labels.proposal_types import Proposals  # noqa: E402
from a3tune.labels.proposals import generate_proposals, prepare_image  # noqa: E402
from a3tune.labels.sam_backends import build_sam  # noqa: E402

KINDS = {"body": "body", "organ": "organ", "lesion": "lesion", "cyst": "lesion", "bone": "other", "marker": "other"}
COLUMNS = ("body", "organ", "lesion", "all", "other")
GRID_SIDES = (32, 64, 128, 224)
METHODS = ("boxes", "candidates", "classes", "grid", "grid25", "oracle", "points")


def phantom_images(n: int, size: int, seed: int) -> list[tuple[np.ndarray, list[tuple[str, np.ndarray]]]]:
    """(image, [(kind, mask at 256 px)]) for the first n test images of the default phantom config."""
    cfg = PhantomConfig(seed=seed, size=size, n_images={"train": 0, "val": 0, "test": n})
    out = []
    for plan in plan_split(cfg, "test")[:n]:
        scene = draw(cfg, plan)
        truth = [(KINDS[s.kind], cv2.resize(s.mask.astype(np.uint8), (256, 256), interpolation=cv2.INTER_NEAREST) > 0)
                 for s in scene.structures.values()]  # fmt: skip
        out.append((scene.image, truth))
    return out


def real_images(root: str, n: int) -> list[tuple[np.ndarray, list[tuple[str, np.ndarray]]]]:
    """(image, [("level/kind", mask at 256 px)]) for n evenly spaced slices of a folder built by
    bench/real_scans.py, with the structures of both its levels."""
    out = {}
    for level in LEVELS:
        for slice_id, image, truth in load_slices(root, n, level):
            out.setdefault(slice_id, (image, []))[1].extend(
                (f"{level}/{kind}", cv2.resize(mask.astype(np.uint8), (256, 256), interpolation=cv2.INTER_NEAREST) > 0)
                for kind, _, mask in truth
            )
    return list(out.values())


def iou_matrix(truth: list[tuple[str, np.ndarray]], masks: np.ndarray) -> np.ndarray:
    """IoU of every true structure with every mask: (structures, masks)."""
    return mask_iou_matrix(np.stack([m for _, m in truth]), masks)


def best_iou(truth: list[tuple[str, np.ndarray]], masks: np.ndarray) -> list[tuple[str, float]]:
    if len(masks) == 0:
        return [(kind, 0.0) for kind, _ in truth]
    return list(zip([k for k, _ in truth], iou_matrix(truth, masks).max(axis=1).tolist()))


def level_of(kind: str) -> str:
    """The structure level of a real slice's "level/kind" ("" for the phantom's kinds)."""
    return kind.split("/", 1)[0] if "/" in kind else ""


def chosen_with_labels(truth: list[tuple[str, np.ndarray]], masks: np.ndarray, cap: int) -> dict[str, np.ndarray]:
    """Per structure level, ``cap`` of ``masks`` chosen with the labels: greedily, the mask that adds
    most to the summed best Dice first. A bound for any generator that keeps ``cap`` of these masks."""
    out = {}
    for level in sorted({level_of(kind) for kind, _ in truth}):
        part = [(kind, mask) for kind, mask in truth if level_of(kind) == level]
        iou = iou_matrix(part, masks) if len(masks) else np.zeros((len(part), 0))
        dice, best, chosen = 2 * iou / (1 + iou), np.zeros(len(part)), []
        for _ in range(min(cap, len(masks))):
            chosen.append(int(np.maximum(dice, best[:, None]).sum(axis=0).argmax()))
            best = np.maximum(best, dice[:, chosen[-1]])
        out[level] = masks[chosen]
    return out


def dense_box_grid(sam, image: np.ndarray) -> np.ndarray:
    """LiteMedSAM on 284 grid boxes (full decoder), kept at predicted IoU > 0.5 and stability >= 0.5."""
    from segment_anything import SamPredictor
    from segment_anything.utils.amg import calculate_stability_score

    working = prepare_image(image, 256)
    boxes = np.array([[x, y, x + s - 1, y + s - 1] for s in GRID_SIDES for y in range(0, 256 - s + 1, s // 2)
                      for x in range(0, 256 - s + 1, s // 2)], dtype=np.float64)  # fmt: skip
    predictor = SamPredictor(sam.model)
    predictor.set_image(working)
    model_boxes = torch.as_tensor(predictor.transform.apply_boxes(boxes, (256, 256)), dtype=torch.float32)
    kept = []
    with torch.no_grad():
        for start in range(0, len(model_boxes), 64):
            logits, iou, _ = predictor.predict_torch(None, None, model_boxes[start : start + 64],
                                                     multimask_output=False, return_logits=True)  # fmt: skip
            logits, iou = logits[:, 0], iou[:, 0]
            stability = calculate_stability_score(logits, sam.model.mask_threshold, 1.0)
            keep = (iou > 0.5) & (stability >= 0.5)
            kept.append((logits[keep] > sam.model.mask_threshold).numpy())
    return np.concatenate(kept)


def oracle_boxes(sam, image: np.ndarray, truth: list[tuple[str, np.ndarray]]) -> np.ndarray:
    """LiteMedSAM prompted with each true structure's tight box at 256 px: one mask per structure."""
    from segment_anything import SamPredictor

    predictor = SamPredictor(sam.model)
    predictor.set_image(prepare_image(image, 256))
    boxes = []
    for _, mask in truth:
        ys, xs = np.nonzero(mask)
        boxes.append([xs.min(), ys.min(), xs.max(), ys.max()])
    model_boxes = torch.as_tensor(predictor.transform.apply_boxes(np.array(boxes, dtype=np.float64), (256, 256)))
    with torch.no_grad():
        masks, _, _ = predictor.predict_torch(None, None, model_boxes.float(), multimask_output=False)
    return masks[:, 0].numpy()


def candidates_only(image: np.ndarray, params: ProposalParams) -> np.ndarray:
    """The box generator's candidate regions, as prompted (after box NMS), without the model."""
    working = prepare_image(image, params.working_size, params.channel_order)
    found, _ = bx.prompt_candidates(bx.denoised_grey(working, params.boxes.smooth_sigma), params.boxes)
    return found.masks


def intensity_classes(image: np.ndarray, params: ProposalParams) -> np.ndarray:
    """The components of multi-level intensity classes of the generator's denoised working image."""
    working = prepare_image(image, params.working_size, params.channel_order)
    bp = params.boxes
    grey = bx.denoised_grey(working, bp.smooth_sigma)
    return class_components(grey, foreground_level=bp.grid_foreground_level, min_area=bp.min_region_area)


def run(name: str, images, propose) -> dict:
    """Best IoU per structure, proposals and seconds per image for one method."""
    scores, counts, wall, cpu, model = [], [], [], [], []
    for image, truth in images:
        started, cpu_started = time.perf_counter(), time.process_time()
        found = propose(image, truth)
        wall.append(time.perf_counter() - started)
        cpu.append(time.process_time() - cpu_started)
        if isinstance(found, Proposals):
            model.append((found.timings.encoder_s, found.timings.decoder_s, found.timings.decoder_calls))
        # One set of masks for every structure, or one per structure level
        per_level = found if isinstance(found, dict) else {level_of(k): found for k, _ in truth}
        per_level = {k: v.masks if isinstance(v, Proposals) else v for k, v in per_level.items()}
        counts.append(max((len(masks) for masks in per_level.values()), default=0))
        scores.extend(s for level, masks in per_level.items()
                      for s in best_iou([t for t in truth if level_of(t[0]) == level], masks))  # fmt: skip
        print(f"  {name}: image {len(counts)}/{len(images)}, {counts[-1]} proposals, {wall[-1]:.1f} s", file=sys.stderr)
    return {"name": name, "images": len(images), "scores": scores, "count": np.mean(counts), "wall": np.mean(wall),
            "cpu": np.mean(cpu), "model": np.mean(model, axis=0) if model else None}  # fmt: skip


def row(result: dict, columns: tuple[str, ...], level: str | None = None) -> str:
    """Per kind: share at best IoU >= 0.5 / >= 0.75, mean best Dice (structures); "all" leaves out "other".

    ``level``: only the structures whose kind is ``"<level>/<kind>"`` (real slices)."""
    scores = [(k.removeprefix(f"{level}/"), v) for k, v in result["scores"] if level is None or k.startswith(f"{level}/")]
    cells = []
    for column in columns:
        ious = np.array([v for k, v in scores if k == column or (column == "all" and k != "other")])
        dice = np.mean(2 * ious / (1 + ious)) if len(ious) else 0.0
        cells.append(f"{np.mean(ious >= 0.5):.2f} / {np.mean(ious >= 0.75):.2f} / {dice:.3f} ({len(ious)})" if len(ious) else "-")
    return (f"| {result['name']} | {result['images']} | " + " | ".join(cells)
            + f" | {result['count']:.1f} | {result['wall']:.2f} | {result['cpu']:.2f} |")  # fmt: skip


def run_methods(images, methods: set[str], grid_images: int, lite, params: ProposalParams) -> list[dict]:
    """Every selected method on the same images, in the table's order."""
    results = []
    if "boxes" in methods:
        results.append(run("boxes: candidates + LiteMedSAM box prompts + filters", images,
                           lambda image, _: generate_proposals(lite, image, params)))  # fmt: skip
    if "candidates" in methods:
        results.append(run("candidates alone (no model, as prompted)", images,
                           lambda image, _: candidates_only(image, params)))  # fmt: skip
    if "classes" in methods:
        results.append(run("intensity classes: components of 3 / 4 Otsu classes, opened (no model)", images,
                           lambda image, _: intensity_classes(image, params)))  # fmt: skip
    grid_masks: dict[int, np.ndarray] = {}  # by id(image): the bound row reuses the grid's masks

    def grid(image: np.ndarray) -> np.ndarray:
        if id(image) not in grid_masks:
            grid_masks[id(image)] = dense_box_grid(lite, image)
        return grid_masks[id(image)]

    if "grid" in methods and grid_images > 0:
        results.append(run("box grid 32/64/128/224, pIoU >= 0.5, stability >= 0.5 (LiteMedSAM)",
                           images[:grid_images], lambda image, _: grid(image)))  # fmt: skip
    if "grid25" in methods and grid_images > 0:
        cap = params.boxes.max_proposals
        results.append(run(f"bound: {cap} of the box grid's masks, chosen with the labels (reference)",
                           images[:grid_images], lambda image, truth: chosen_with_labels(truth, grid(image), cap)))  # fmt: skip
    if "oracle" in methods:
        results.append(run("oracle: LiteMedSAM, each true structure's tight box (reference)", images,
                           lambda image, truth: oracle_boxes(lite, image, truth)))  # fmt: skip
    if "points" in methods:
        tiny = build_sam("tiny", seed=0)
        reference = ProposalParams()
        permissive = ProposalParams.from_dict({"pred_iou_thresh": 0.0, "stability_score_thresh": 0.0, "min_side": 6})
        results.append(run("point grid, reference parameters (tiny SAM, random weights)", images,
                           lambda image, _: generate_proposals(tiny, image, reference).masks))  # fmt: skip
        results.append(run("point grid, IoU/stability thresholds off, min_side 6 (tiny SAM, random weights)", images,
                           lambda image, _: generate_proposals(tiny, image, permissive).masks))  # fmt: skip
    return results


def print_table(results: list[dict], columns: tuple[str, ...], level: str | None = None, timings: bool = True) -> None:
    print("| method | images | " + " | ".join(columns) + " | proposals / image | s / image (wall) | CPU s / image |")
    print("|---|---|" + "---|" * len(columns) + "---|---|---|")
    for result in results:
        print(row(result, columns, level))
    print()
    for result in results if timings else ():
        if result["model"] is not None:
            encoder, decoder, calls = result["model"]
            print(
                f"{result['name'].split(':')[0]}: per image {encoder:.2f} s image encoder, {decoder:.2f} s prompt "
                f"encoder + mask decoder ({calls:.1f} decoder calls), {result['wall'] - encoder - decoder:.2f} s "
                "everything else (candidate regions, filters)."
            )
    print()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=24, help="phantom test images (default 24)")
    parser.add_argument("--size", type=int, default=128, help="phantom image side in px (default 128, the config's)")
    parser.add_argument("--seed", type=int, default=0, help="phantom seed (default 0; the defaults were tuned on 1)")
    parser.add_argument("--grid-images", type=int, default=2, help="images for the slow dense box grid (default 2)")
    parser.add_argument("--boxes", default="{}", help="box-generator parameters to change, as JSON (default: none)")
    parser.add_argument("--real-grid-images", type=int, help="real slices for the dense box grid (default: all of them)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset to run (default: all)")
    parser.add_argument("--real", help="also run on --images slices of this folder, built by bench/real_scans.py")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    methods = set(args.methods.split(","))
    if methods - set(METHODS):
        parser.error(f"unknown method(s) {sorted(methods - set(METHODS))}; known: {', '.join(METHODS)}")
    load_before = os.getloadavg()
    images = phantom_images(args.images, args.size, args.seed)
    real = real_images(args.real, args.images) if args.real else []
    params = ProposalParams.from_dict({**bx.BOX_GENERATOR_DEFAULTS, "boxes": json.loads(args.boxes)})
    lite = None
    if methods & {"boxes", "grid", "grid25", "oracle"}:
        lite = build_sam("litemedsam")
        generate_proposals(lite, images[0][0], params)  # warm-up: first-call allocations are not per-image cost
    results = run_methods(images, methods, args.grid_images, lite, params)
    real_grid = len(real) if args.real_grid_images is None else args.real_grid_images
    real_results = run_methods(real, methods, real_grid, lite, params) if real else []
    load_after = os.getloadavg()
    print(
        f"\nTorch threads {args.threads} (OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}), {os.cpu_count()} CPUs; "
        f"load average before {load_before[0]:.1f}, after {load_after[0]:.1f} (1 min)."
    )
    print("Per kind: share of structures whose best proposal has IoU >= 0.5 / >= 0.75 / mean best Dice (number of structures).\n")
    print(
        f"Phantom seed {args.seed}, split test, {args.size} px images at 256 px working size; lesion = lesions and "
        "cysts; other = spine and marker, not in all.\n"
    )
    print_table(results, COLUMNS)
    for level in LEVELS if real else ():
        kinds = tuple(sorted({k.split("/", 1)[1] for _, truth in real for k, _ in truth if k.startswith(f"{level}/")}))
        print(f"Real slices: {len(real)} of {args.real} (evenly spaced), at 256 px working size; level {level}.\n")
        print_table(real_results, kinds + ("all",), level, timings=level == LEVELS[-1])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
