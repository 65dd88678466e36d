"""c-BTM sparse ensemble: the mixture arithmetic, the scored suffix, and on a real tiny recipe run that a
top-1 ensemble scores each row with the branch its prefix routes to, on the same tokens as 'single'."""

import math

import numpy as np
import pytest

from voltron_jax.experiments import ensemble


def test_mix_is_the_prior_weighted_mixture_of_probabilities():
    rng = np.random.default_rng(0)
    logps = np.log(rng.dirichlet(np.ones(5), size=(3, 2, 4)))[..., 0]  # [K=3, B=2, T=4]
    one_hot = np.array([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0]], np.float32)
    np.testing.assert_allclose(ensemble.mix(logps, one_hot), np.stack([logps[1, 0], logps[0, 1]]), rtol=1e-6)
    prior = np.array([[0.2, 0.3, 0.5], [0.6, 0.0, 0.4]], np.float32)
    want = np.log(np.einsum("bk,kbt->bt", prior, np.exp(logps)))
    np.testing.assert_allclose(ensemble.mix(logps, prior), want, rtol=1e-5)


def test_only_tokens_after_the_prefix_are_scored():
    w = ensemble.scored_mask({"weights": np.ones((2, 8), np.float32)}, prefix=3)
    np.testing.assert_array_equal(w.sum(1), [5, 5])
    assert not w[:, :3].any()


def test_bad_arguments_are_one_clear_error(tmp_path):
    with pytest.raises(ensemble.EnsembleError, match="choose one of"):
        ensemble.evaluate(str(tmp_path), mode="bagging")
    with pytest.raises(ensemble.EnsembleError, match="no config.json"):
        ensemble.evaluate(str(tmp_path))


@pytest.mark.slow
@pytest.mark.heavy  # minutes: make test-heavy
def test_top1_ensemble_uses_the_routed_branch_on_the_same_tokens(tmp_path):
    import jax

    from configs import recipe_tiny
    from voltron_jax import train
    from voltron_jax.data import cbtm, pipeline
    from voltron_jax.data import vocab as vocab_lib

    c = recipe_tiny.get_config("test")
    train.run(c, str(tmp_path))
    kw = dict(n_batches=2, prefix=100)
    single = ensemble.evaluate(str(tmp_path), mode="single", **kw)
    ens = ensemble.evaluate(str(tmp_path), mode="cbtm_ensemble", top_k=1, **kw)
    assert single["tokens"] == ens["tokens"] == 2 * c.data.batch_size * (c.data.seq_len - 100)
    assert math.isfinite(single["loss"]) and math.isfinite(ens["loss"])

    # the same number by hand: route each row's first 100 bytes to one cluster, score that branch
    phases = [p for p in train.phases(c, tmp_path) if p.member is not None]
    batches = pipeline.make_eval_batches(phases[0].config, "pretrain", 2)
    clusterer = cbtm.ClusterModel.load(str(tmp_path / "data"))
    vocab = vocab_lib.make_vocab(c.data, str(tmp_path))
    rt = train.Runtime(phases[0])
    fn = ensemble.token_logprob_fn(rt)
    params = [jax.device_get(train.restore_final(p, rt.abstract)[0]) for p in phases]
    total = 0.0
    for b in batches:
        chosen = clusterer.predict([vocab.decode(r[:100].tolist()) for r in b["inputs"]])
        for j in set(chosen.tolist()):
            lp = np.asarray(fn(params[j].params, params[j].step, b))
            total -= float(lp[chosen == j, 100:].sum())
    assert ens["loss"] == pytest.approx(total / ens["tokens"], rel=1e-5)
    assert (
        len(set(clusterer.predict([vocab.decode(r[:100].tolist()) for b in batches for r in b["inputs"]])))
        > 1
    )


@pytest.mark.slow
@pytest.mark.heavy  # a whole recipe_tiny:test,cbtm run (~1 min): make test-heavy
def test_cbtm_control_decays_each_branch_from_its_own_branch_and_ensembles_the_decayed_ones(tmp_path):
    """recipe_tiny.py:cbtm: branch_decay member i starts from branch member i's final params (a fan-out
    phase from a fan-out phase), and the ensemble mixes the decayed branches (their final step)."""
    import jax

    from configs import recipe_tiny
    from voltron_jax import train

    c = recipe_tiny.get_config("test,cbtm")
    train.run(c, str(tmp_path))
    phases = train.phases(c, tmp_path)
    branch = [p for p in phases if p.name == "branch"]
    decayed = [p for p in phases if p.name == "branch_decay"]
    assert len(branch) == len(decayed) == c.data.n_clusters
    rt = train.Runtime(decayed[3])
    start = jax.device_get(train.init_from_parents(rt, c, phases, decayed[3]).params)
    own = jax.device_get(train.restore_final(branch[3], rt.abstract)[0].params)
    other = jax.device_get(train.restore_final(branch[2], rt.abstract)[0].params)
    same = jax.tree.leaves(jax.tree.map(lambda a, b: bool(np.array_equal(a, b)), start, own))
    differ = jax.tree.leaves(jax.tree.map(lambda a, b: bool(np.array_equal(a, b)), start, other))
    assert all(same) and not all(differ)
    ens = ensemble.evaluate(str(tmp_path), mode="cbtm_ensemble", n_batches=2, prefix=32)
    assert ens["step"] == decayed[0].start + decayed[0].steps and math.isfinite(ens["loss"])
    assert len(ens["batches"]) == 2 and np.mean(list(ens["batches"].values())) == pytest.approx(ens["loss"])
    assert 1 <= ens["distinct_rows"] <= 2 * c.data.batch_size
