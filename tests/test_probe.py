"""Head probing: the scores on hand-made captures, a constructed image-attending head ranked first,
and the stage end to end (heads.parquet with its contract and provenance, the heatmap)."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest
import torch
from fixtures_lvlm import write_lvlm_inputs

from a3tune.io.contracts import check_contract
from a3tune.io.parquet import read_parquet
from a3tune.io.provenance import read_provenance
from a3tune.models.capture import LayerCapture, capture_attention, enable_capture
from a3tune.models.layout import encode_batch
from a3tune.models.lvlm import build_tiny_llava
from a3tune.probe.head_scores import HeadScoreAccumulator, n_selected, rank_heads
from a3tune.probe.probe_stage import check_label_geometry, run_probe

pytestmark = pytest.mark.usefixtures("one_thread")

CORPUS = ["is there a lesion in the liver", "yes no", "which organ is bright", "the spleen"]


# ------------------------------------------------------------------------------------------------
# Scores on hand-made captures


def test_scores_are_the_mean_image_share_and_the_inside_share_over_post_image_rows():
    # One sample, N = 4 positions, rows 2 and 3 are post-image; two heads; one label map of two
    share = torch.tensor([[[9.0, 9.0, 0.5, 1.0], [9.0, 9.0, 0.2, 0.2]]])  # rows 0-1 must be ignored
    inside = torch.tensor([[[[9.0, 9.0, 0.25, 0.25], [9.0, 9.0, 0.0, 0.0]]], [[[9.0, 9.0, 0.1, 0.1], [0, 0, 0, 0]]]])
    inside = inside.permute(1, 0, 2, 3)  # (B=1, h=2, k=2, N)
    cap = LayerCapture(heads=torch.tensor([0, 1]), image_share=share, inside=inside, probabilities=None, row_start=0)
    post = torch.tensor([[False, False, True, True]])
    acc = HeadScoreAccumulator(n_layers=1, n_heads=2)
    acc.add({0: cap}, post, label_maps=torch.tensor([[True, False]]))  # only the first map is real
    table = acc.table(top_k=1).sort("head")
    # score: mean of (0.5, 1.0) and of (0.2, 0.2)
    assert table["score"].to_list() == pytest.approx([0.75, 0.2])
    # inside: (0.25 + 0.25) / (0.5 + 1.0) and (0.1 + 0.1) / (0.2 + 0.2); the empty second map is ignored
    assert table["inside_score"].to_list() == pytest.approx([1 / 3, 0.5])
    assert table["rank"].to_list() == [1, 2] and table["selected"].to_list() == [True, False]
    check_contract(table, "heads")
    # Ranked by inside_score instead, head 1 comes first
    assert acc.table(top_k=1, rank_by="inside_score").sort("head")["rank"].to_list() == [2, 1]


def test_unlabelled_samples_count_for_the_score_only():
    cap = LayerCapture(heads=torch.tensor([0]), image_share=torch.full((1, 1, 2), 0.4), inside=None,
                       probabilities=None, row_start=0)  # fmt: skip
    acc = HeadScoreAccumulator(1, 1)
    acc.add({0: cap}, torch.tensor([[True, True]]))
    table = acc.table(top_k=1)
    assert table["score"].item() == pytest.approx(0.4) and table["inside_score"].is_null().all()
    with pytest.raises(ValueError, match="needs labelled"):
        acc.table(top_k=1, rank_by="inside_score")
    with pytest.raises(ValueError, match="no tokens after its image"):
        acc.add({0: cap}, torch.tensor([[False, False]]))


@pytest.mark.parametrize(("top_k", "n"), [(128, 128), (2000, 1024), (0.125, 128), (1e-9, 1), (1, 1)])
def test_top_k_is_a_count_or_a_fraction(top_k, n):
    assert n_selected(top_k, 1024) == n


@pytest.mark.parametrize("top_k", [0, -1, 2.5, True, "8"])
def test_bad_top_k_is_refused(top_k):
    with pytest.raises(ValueError, match="top_k"):
        n_selected(top_k, 1024)


def test_ranks_break_ties_in_layer_head_order():
    assert rank_heads(np.array([[0.5, 0.9], [0.5, 0.1]]), "score").tolist() == [[2, 1], [3, 4]]
    with pytest.raises(ValueError, match="rank_by"):
        rank_heads(np.zeros(2), "loudness")


# ------------------------------------------------------------------------------------------------
# A constructed head that attends only to the image is ranked first

LAYER, HEAD = 1, 2


def _image_attending_model():
    """A tiny LLaVA whose head (LAYER, HEAD) puts its attention on the image tokens, by construction.

    The projector writes a large value into hidden dimension 0 of every image token (text tokens
    have 0 there) and every text embedding holds a 1 in dimension 1. The head's query reads
    dimension 1 and its key dimension 0, both into the RoPE pair with the lowest frequency (almost
    no rotation at rope_theta 1e6), so a text query's logit on an image key is large and on a text
    key zero. The residual stream keeps both dimensions up to layer LAYER.
    """
    lvlm = build_tiny_llava(corpus=CORPUS, text_hidden=32, text_layers=2, text_heads=4, kv_heads=2,
                            rope_theta=1e6, seed=3)  # fmt: skip
    inner = lvlm.model.model
    with torch.no_grad():
        projector = inner.multi_modal_projector.linear_2
        projector.weight.zero_()
        projector.bias.zero_()
        projector.bias[0] = 4.0
        embed = inner.language_model.embed_tokens.weight
        embed[:, 0] = 0.0
        embed[:, 1] = 1.0
        attn = inner.language_model.layers[LAYER].self_attn
        d = attn.head_dim
        kv = HEAD // (attn.config.num_attention_heads // attn.config.num_key_value_heads)
        slow = d // 2 - 1  # the pair (d/2 - 1, d - 1) rotates slowest
        attn.q_proj.weight[HEAD * d : (HEAD + 1) * d] = 0.0
        attn.k_proj.weight[kv * d : (kv + 1) * d] = 0.0
        attn.q_proj.weight[HEAD * d + slow, 1] = 30.0
        attn.k_proj.weight[kv * d + slow, 0] = 30.0
    return lvlm


def test_probe_ranks_a_constructed_image_attending_head_first():
    lvlm = _image_attending_model()
    enable_capture(lvlm.model)
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, (40 + 9 * i, 50, 3), dtype=np.uint8) for i in range(3)]
    batch = encode_batch(lvlm, images, ["is there a lesion in the liver", "which organ is bright", "is there a lesion"],
                         ["yes", "the spleen", "no"])  # fmt: skip
    text = lvlm.model.config.text_config
    acc = HeadScoreAccumulator(text.num_hidden_layers, text.num_attention_heads)
    with torch.no_grad(), capture_attention(heads="all", image_index=batch.image_index) as captured:
        lvlm.model(**batch.inputs)
    acc.add(captured, batch.post_image)
    table = acc.table(top_k=1).sort("rank")
    first = table.row(0, named=True)
    assert (first["layer"], first["head"]) == (LAYER, HEAD) and first["selected"]
    assert first["score"] > 0.99 and table["score"][1] < 0.95


# ------------------------------------------------------------------------------------------------
# The stage end to end


@pytest.fixture(scope="module")
def probe_inputs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("probe")
    return tmp, tmp / "raw", write_lvlm_inputs(tmp)


def test_stage_writes_ranked_heads_with_provenance_and_a_heatmap(probe_inputs):
    tmp, root, n_train = probe_inputs
    out, figure = tmp / "out" / "heads.parquet", tmp / "out" / "heads.png"
    run_probe({"path": str(tmp / "model")}, tmp / "samples.parquet", tmp / "images.parquet", tmp / "labels.parquet",
              tmp / "labels.zarr", root, out, figure, n_samples=20, batch_size=2, top_k=0.25, progress=False)  # fmt: skip
    heads = read_parquet(out, contract="heads")
    assert heads.height == 2 * 4 and sorted(heads["rank"].to_list()) == list(range(1, 9))
    assert heads["selected"].sum() == 2
    assert heads.filter(pl.col("selected"))["rank"].max() == 2
    assert heads["score"].is_between(0, 1).all() and heads["inside_score"].is_between(0, 1).all()
    prov = read_provenance(out)
    assert prov.stage == "probe_heads" and prov.params["dtype"] == "torch.float32"
    # The labelled train samples only (the first has an empty label), all with a label
    assert prov.params["n_samples"] == prov.params["n_labelled"] == n_train - 1
    assert {"samples.parquet", "labels.zarr", "model"} <= set(prov.inputs)
    assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # Deterministic: a rerun gives the same bytes
    again = tmp / "again.parquet"
    run_probe({"path": str(tmp / "model")}, tmp / "samples.parquet", tmp / "images.parquet", tmp / "labels.parquet",
              tmp / "labels.zarr", root, again, n_samples=20, batch_size=3, top_k=0.25, progress=False)  # fmt: skip
    assert read_parquet(again)["rank"].to_list() == heads["rank"].to_list()


def test_labels_for_another_grid_are_refused(probe_inputs, tmp_path):
    tmp, _, _ = probe_inputs
    lvlm = build_tiny_llava(corpus=CORPUS, image_size=224)  # G 16, labels are on G 8
    with pytest.raises(ValueError, match=r"grid 8 \(model: 16\).*input_size 112 \(model: 224\)"):
        check_label_geometry(tmp / "labels.zarr", lvlm)
