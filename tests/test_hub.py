"""A process that cannot resolve the Hub's host goes offline at once instead of retrying."""

from __future__ import annotations

import logging
import time

import huggingface_hub.constants
import pytest
from omegaconf import OmegaConf

from pruneflow import hub
from pruneflow.errors import UserError
from pruneflow.tasks.hf_data import load_splits

UNRESOLVABLE = "https://hub.invalid"  # RFC 2606: .invalid never resolves


@pytest.fixture
def fresh(monkeypatch: pytest.MonkeyPatch):
    """Each test decides anew, and the flags it sets are put back afterwards."""
    for k in (*hub.ENV, *hub.PROXY_ENV, "HF_ENDPOINT"):
        monkeypatch.delenv(k, raising=False)
    datasets_config = pytest.importorskip("datasets.config")
    for mod, attr in ((huggingface_hub.constants, "HF_HUB_OFFLINE"), (datasets_config, "HF_HUB_OFFLINE"),
                      (datasets_config, "HF_DATASETS_OFFLINE")):
        monkeypatch.setattr(mod, attr, False)
    hub.offline_if_unreachable.cache_clear()
    yield monkeypatch
    hub.offline_if_unreachable.cache_clear()


def test_resolves_says_no_for_an_invalid_host() -> None:
    assert hub.resolves("hub.invalid") is False


def test_unresolvable_host_switches_the_process_offline(fresh: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    import datasets.config

    fresh.setattr(huggingface_hub.constants, "ENDPOINT", UNRESOLVABLE)
    with caplog.at_level(logging.WARNING, logger="pruneflow.hub"):
        assert hub.offline_if_unreachable() is True
        assert hub.offline_if_unreachable() is True  # decided once per process
    assert [r.getMessage().split(" cannot")[0] for r in caplog.records] == ["hub.invalid"]
    assert hub.is_offline()
    # the copies huggingface_hub and datasets read at import follow, not only the environment
    assert huggingface_hub.constants.HF_HUB_OFFLINE is True
    assert datasets.config.HF_HUB_OFFLINE is True and datasets.config.HF_DATASETS_OFFLINE is True


def test_a_proxy_leaves_the_decision_to_the_hub_client(fresh: pytest.MonkeyPatch) -> None:
    fresh.setattr(huggingface_hub.constants, "ENDPOINT", UNRESOLVABLE)
    fresh.setenv("HTTPS_PROXY", "http://proxy.invalid:3128")  # the proxy may resolve what this machine cannot
    assert hub.offline_if_unreachable() is False
    assert not hub.is_offline() and huggingface_hub.constants.HF_HUB_OFFLINE is False


def test_already_offline_is_kept(fresh: pytest.MonkeyPatch) -> None:
    fresh.setenv("HF_HUB_OFFLINE", "1")
    assert hub.offline_if_unreachable() is True


def test_temporary_offline_block_restores_the_flags(fresh: pytest.MonkeyPatch) -> None:
    with hub.offline():
        assert hub.is_offline() and huggingface_hub.constants.HF_HUB_OFFLINE is True
    assert not hub.is_offline() and huggingface_hub.constants.HF_HUB_OFFLINE is False


def test_hub_dataset_fails_at_once_without_retries(fresh: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """Before, huggingface_hub retried the unreachable host five times with back-off (about
    30 s) before the same error."""
    fresh.setattr(huggingface_hub.constants, "ENDPOINT", UNRESOLVABLE)
    cfg = OmegaConf.create({"name": "glue/sst2", "path": None})
    start = time.perf_counter()
    with caplog.at_level(logging.WARNING), pytest.raises(UserError, match="Offline, set task.path"):
        load_splits(cfg, "nyu-mll/glue", "sst2", ["train", "validation"])
    assert not [r for r in caplog.records if "Retrying" in r.getMessage()]
    assert time.perf_counter() - start < 15
