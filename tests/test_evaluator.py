"""MultilabelZSLEvaluator: batched accumulation equals the one-shot functional API, its errors, and torch.distributed."""
import datetime
import math
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pyzsl._backend import available_backends
from pyzsl.metrics import MultilabelZSLEvaluator, multilabel_evaluation

BACKENDS = [b for b in ("reference", "cpp") if b in available_backends("cpu")]
PROTOCOL_NAMES = ["lesa", "sdl", "biam"]
L = 20
UNSEEN = [17, 3, 8, 12, 0, 19]  # deliberately unsorted
SEEN = [1, 2, 4, 5, 6, 7, 9, 10, 11, 13, 14, 16]  # 15 and 18 are neither seen nor unseen


def make_data(N, seed, *, tied=False):
    g = torch.Generator().manual_seed(seed)
    scores = torch.randint(0, 3, (N, L), generator=g).float() if tied else torch.randn(N, L, generator=g)
    u = torch.rand(N, L, generator=g)
    targets = torch.where(u < 0.2, 1, torch.where(u < 0.45, 0, -1)).to(torch.int8)
    targets[: N // 4, UNSEEN] = -1  # images without an unseen positive: the protocols disagree on them
    targets[:, 17] = torch.where(targets[:, 17] == 1, 0, targets[:, 17])  # an unseen label without positive
    return scores, targets


def expected_results(scores, targets, *, ks, protocol, backend, seen=SEEN, unseen=UNSEEN):
    """The one-shot functional results, over the columns in score-matrix order."""
    results = {}
    subsets = {"zsl": sorted(unseen)}
    if seen is not None:
        subsets["gzsl"] = sorted(unseen + seen)
    for name, columns in subsets.items():
        metrics = multilabel_evaluation(scores[:, columns], targets[:, columns], ks=ks, protocol=protocol,
                                        backend=backend)
        results.update({f"{name}/{key}": value for key, value in metrics.items()})
    return results


def assert_same_results(actual, expected):
    assert list(actual) == list(expected)
    for key, value in expected.items():
        if math.isnan(value):
            assert math.isnan(actual[key]), key
        else:
            assert actual[key] == pytest.approx(value, abs=1e-12, rel=0), key


def feed(evaluator, scores, targets, sizes):
    start = 0
    for size in sizes:
        evaluator.update(scores[start : start + size], targets[start : start + size])
        start += size
    assert start == scores.shape[0]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("protocol", PROTOCOL_NAMES)
def test_batches_equal_one_shot(protocol, backend):
    scores, targets = make_data(83, seed=PROTOCOL_NAMES.index(protocol))
    evaluator = MultilabelZSLEvaluator(unseen=UNSEEN, seen=SEEN, ks=(1, 3, 5), protocol=protocol, backend=backend)
    feed(evaluator, scores, targets, [1, 17, 0, 40, 25])
    results = evaluator.compute()
    expected = expected_results(scores, targets, ks=(1, 3, 5), protocol=protocol, backend=backend)
    assert set(results) == {f"{s}/{m}" for s in ("zsl", "gzsl") for m in
                            ["mAP"] + [f"{x}@{k}" for k in (1, 3, 5) for x in ("P", "R", "F1")]}
    assert_same_results(results, expected)
    # The ZSL and GZSL numbers really come from different columns.
    assert results["zsl/mAP"] != results["gzsl/mAP"]
    # compute() does not consume the state; another batch changes the answer; reset() starts over.
    assert_same_results(evaluator.compute(), expected)
    more_scores, more_targets = make_data(9, seed=99)
    evaluator.update(more_scores, more_targets.long())  # any integer target dtype
    assert_same_results(evaluator.compute(), expected_results(torch.cat([scores, more_scores]),
                                                              torch.cat([targets, more_targets]), ks=(1, 3, 5),
                                                              protocol=protocol, backend=backend))
    evaluator.reset()
    feed(evaluator, more_scores, more_targets, [4, 5])
    assert_same_results(evaluator.compute(), expected_results(more_scores, more_targets, ks=(1, 3, 5),
                                                              protocol=protocol, backend=backend))


@pytest.mark.skipif("cpp" not in BACKENDS, reason="the C++ extension is not built")
@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("protocol", PROTOCOL_NAMES)
def test_cpp_evaluator_equals_the_reference(protocol, tied):
    # The other tests compare the evaluator with the functional API on the same backend; here the oracle is the
    # plain-PyTorch evaluation of the same columns.
    scores, targets = make_data(131, seed=7 + PROTOCOL_NAMES.index(protocol), tied=tied)
    evaluator = MultilabelZSLEvaluator(unseen=UNSEEN, seen=SEEN, ks=(1, 3, 5), protocol=protocol, backend="cpp")
    feed(evaluator, scores, targets, [64, 67])
    expected = expected_results(scores, targets, ks=(1, 3, 5), protocol=protocol, backend="reference")
    results = evaluator.compute()
    assert list(results) == list(expected)
    for key, value in expected.items():
        assert results[key] == pytest.approx(value, abs=1e-9, rel=0, nan_ok=True), key


@pytest.mark.parametrize("backend", BACKENDS)
def test_zsl_only_and_every_column(backend):
    scores, targets = make_data(40, seed=5, tied=True)
    # unseen in matrix order here: how ties follow a shuffled ``unseen`` is the next test's subject
    evaluator = MultilabelZSLEvaluator(unseen=sorted(UNSEEN), ks=(2,), backend=backend)
    feed(evaluator, scores, targets, [30, 10])
    results = evaluator.compute()
    assert set(results) == {"zsl/mAP", "zsl/P@2", "zsl/R@2", "zsl/F1@2"}
    assert_same_results(results, expected_results(scores, targets, ks=(2,), protocol="lesa", backend=backend,
                                                  seen=None))
    # unseen + seen = every label: GZSL is the full matrix
    everything = MultilabelZSLEvaluator(unseen=[0, 1, 2], seen=list(range(3, L)), ks=(2,), backend=backend)
    feed(everything, scores, targets, [40])
    full = multilabel_evaluation(scores, targets, ks=(2,), backend=backend)
    assert_same_results({k[5:]: v for k, v in everything.compute().items() if k.startswith("gzsl/")}, full)


@pytest.mark.parametrize("backend", BACKENDS)
def test_zsl_ties_do_not_depend_on_the_order_unseen_is_listed(backend):
    """Top-K ties go to the lower column of the score matrix, for ZSL as for GZSL, however ``unseen`` is ordered."""
    scores, targets = make_data(60, seed=6, tied=True)
    in_order = sorted(UNSEEN)
    expected = expected_results(scores, targets, ks=(1, 2), protocol="lesa", backend=backend, seen=None,
                                unseen=in_order)
    for unseen in (in_order, UNSEEN, in_order[::-1]):
        evaluator = MultilabelZSLEvaluator(unseen=unseen, ks=(1, 2), backend=backend)
        evaluator.update(scores, targets)
        assert_same_results(evaluator.compute(), expected)
    # The same when the unseen labels are every column, listed in another order.
    full = multilabel_evaluation(scores, targets, ks=(1, 2), backend=backend)
    evaluator = MultilabelZSLEvaluator(unseen=list(range(L))[::-1], ks=(1, 2), backend=backend)
    evaluator.update(scores, targets)
    assert_same_results({k[4:]: v for k, v in evaluator.compute().items()}, full)


def test_errors():
    scores, targets = make_data(10, seed=7)
    evaluator = MultilabelZSLEvaluator(unseen=UNSEEN, seen=SEEN)
    with pytest.raises(RuntimeError, match="no batch was added with update"):
        evaluator.compute()
    evaluator.update(scores, targets)
    with pytest.raises(ValueError, match=r"scores must be \[B, 20\] like the earlier batches, got \[10, 19\]"):
        evaluator.update(scores[:, :19], targets[:, :19])
    with pytest.raises(ValueError, match="targets must have the shape of scores"):
        evaluator.update(scores, targets[:, :19])
    with pytest.raises(ValueError, match="targets must take values in"):
        evaluator.update(scores, targets * 2)
    with pytest.raises(ValueError, match="scores must be finite"):
        evaluator.update(torch.full_like(scores, float("nan")), targets)
    assert_same_results(evaluator.compute(), expected_results(scores, targets, ks=(3, 5), protocol="lesa",
                                                              backend=None))  # the bad batches left no trace

    with pytest.raises(ValueError, match="seen and unseen share label indices"):
        MultilabelZSLEvaluator(unseen=[0, 1, 2], seen=[2, 3]).update(scores, targets)
    with pytest.raises(ValueError, match=r"unseen must lie in \[0, 20\), got values from 0 to 20"):
        MultilabelZSLEvaluator(unseen=[0, 20]).update(scores, targets)
    with pytest.raises(ValueError, match=r"seen must lie in \[0, 20\)"):
        MultilabelZSLEvaluator(unseen=[0], seen=[-1, 3]).update(scores, targets)
    with pytest.raises(ValueError, match="unseen contains duplicate indices"):
        MultilabelZSLEvaluator(unseen=[4, 4]).update(scores, targets)
    with pytest.raises(ValueError, match=r"scores must be 2-D \[B, L\]"):
        MultilabelZSLEvaluator(unseen=[0]).update(scores[0], targets[0])
    with pytest.raises(ValueError, match="protocol must be one of"):
        MultilabelZSLEvaluator(unseen=[0], protocol="coco")
    with pytest.raises(ValueError, match="ks must be >= 1, got 0"):
        MultilabelZSLEvaluator(unseen=[0], ks=(0, 3))
    with pytest.raises(ValueError, match="backend must be one of"):
        evaluator = MultilabelZSLEvaluator(unseen=[0], backend="gpu")
        evaluator.update(scores, targets)
        evaluator.compute()


def test_nus_wide_label_space(data_root):
    """The real NUS-WIDE GZSL label space: 81 unseen concepts and the 925 seen tags (1000 tags minus 75 concepts)."""
    folder = data_root / "nus_wide"
    concepts = [line.strip() for line in (folder / "Concepts81.txt").read_text().splitlines() if line.strip()]
    tags = [line.strip() for line in (folder / "TagList1k.txt").read_text().splitlines() if line.strip()]
    seen_tags = [t for t in tags if t not in set(concepts)]
    assert len(concepts) == 81 and len(tags) == 1000 and len(seen_tags) == 925
    labels = concepts + seen_tags  # columns: unseen first, then seen
    g = torch.Generator().manual_seed(8)
    N = 48
    scores = torch.randn(N, len(labels), generator=g)
    targets = torch.where(torch.rand(N, len(labels), generator=g) < 0.02, 1, -1).to(torch.int8)
    unseen, seen = list(range(81)), list(range(81, len(labels)))
    evaluator = MultilabelZSLEvaluator(unseen=unseen, seen=seen, ks=(3, 5))
    feed(evaluator, scores, targets, [16, 16, 16])
    results = evaluator.compute()
    assert_same_results(results, expected_results(scores, targets, ks=(3, 5), protocol="lesa", backend=None,
                                                  seen=seen, unseen=unseen))
    assert 0 < results["gzsl/mAP"] < 1 and results["gzsl/P@5"] <= 5 / 5


# -------------------------------------------------------------------------------------------------- distributed

SHARES = [(0, 13), (13, 50)]  # rank 0 holds 13 images, rank 1 holds 37


def _distributed_worker(rank, world_size, init_file, scores, targets, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=60))
    try:
        begin, end = SHARES[rank]
        results = {}
        for protocol in PROTOCOL_NAMES:
            evaluator = MultilabelZSLEvaluator(unseen=sorted(UNSEEN), seen=SEEN, ks=(1, 3), protocol=protocol,
                                               backend="cpp")
            middle = begin + (end - begin) // 3  # two batches of different sizes per rank
            evaluator.update(scores[begin:middle], targets[begin:middle])
            evaluator.update(scores[middle:end], targets[middle:end])
            results[protocol] = evaluator.compute()
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="torch.distributed with gloo")
@pytest.mark.skipif("cpp" not in BACKENDS, reason="the C++ extension is not built")
def test_distributed_gather_equals_single_process(tmp_path):
    scores, targets = make_data(SHARES[-1][1], seed=9, tied=True)
    mp.spawn(_distributed_worker, args=(2, str(tmp_path / "init"), scores, targets, str(tmp_path)), nprocs=2,
             join=True)
    for rank in range(2):
        results = torch.load(tmp_path / f"rank{rank}.pt")
        for protocol in PROTOCOL_NAMES:
            expected = expected_results(scores, targets, ks=(1, 3), protocol=protocol, backend="cpp")
            assert_same_results(results[protocol], expected)
    # Guard against a vacuous pass: one rank's share alone gives other numbers.
    alone = MultilabelZSLEvaluator(unseen=UNSEEN, seen=SEEN, ks=(1, 3), protocol="lesa", backend="cpp")
    alone.update(scores[: SHARES[0][1]], targets[: SHARES[0][1]])
    assert alone.compute()["gzsl/mAP"] != expected_results(scores, targets, ks=(1, 3), protocol="lesa",
                                                           backend="cpp")["gzsl/mAP"]
