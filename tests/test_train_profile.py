"""train.profile_step / profile_steps: a step range traced into the phase's tb/ as an xplane TensorBoard's
Profile tab (the `profile` extra) opens."""

import jax
import pytest

from configs import tiny
from voltron_jax import train
from voltron_jax.errors import ConfigError


def _config(**train_fields):
    c = tiny.get_config("test")
    c.max_steps = 4
    c.train.async_save = False
    c.train.update(train_fields)
    return c


def test_profile_writes_an_xplane_for_the_step_range(tmp_path, monkeypatch):
    calls, start, stop = [], jax.profiler.start_trace, jax.profiler.stop_trace
    steps = []
    rt_init = train.Runtime.__init__

    def counting_init(self, *a, **k):  # the global step before each train step, to place start/stop
        rt_init(self, *a, **k)
        step = self.train_step

        def counted(state, batch):
            steps.append(int(state.step))
            return step(state, batch)

        self.train_step = counted

    monkeypatch.setattr(train.Runtime, "__init__", counting_init)
    monkeypatch.setattr(
        jax.profiler, "start_trace", lambda d: (calls.append(("start", len(steps), d)), start(d))
    )
    monkeypatch.setattr(jax.profiler, "stop_trace", lambda: (calls.append(("stop", len(steps))), stop()))
    train.run(_config(profile_step=1, profile_steps=2), str(tmp_path), only_phase="stable")
    # started before the step at global step 1, stopped after the step at global step 2
    assert steps == [0, 1, 2, 3]
    assert calls == [("start", 1, str(tmp_path / "00_stable" / "tb")), ("stop", 3)]
    traces = list((tmp_path / "00_stable" / "tb" / "plugins" / "profile").glob("*/*.xplane.pb"))
    assert len(traces) == 1 and traces[0].stat().st_size > 1000


def test_profile_range_past_the_phase_traces_nothing(tmp_path):
    train.run(_config(profile_step=50), str(tmp_path), only_phase="stable")
    assert not (tmp_path / "00_stable" / "tb" / "plugins" / "profile").exists()


def test_profile_steps_must_be_positive(tmp_path):
    with pytest.raises(ConfigError, match="profile_steps"):
        train.run(_config(profile_step=1, profile_steps=0), str(tmp_path))
