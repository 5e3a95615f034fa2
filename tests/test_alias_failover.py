"""An alias fails over from a local target that refuses before answering (queue full,
model file missing) to the next target, as it does from a remote one."""
import pytest

from tests.conftest import remote_config
from tests.tiny_gguf import write_tiny_gguf

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def app(make_app, fake_upstream, tmp_path):
    cfg = remote_config(fake_upstream)
    cfg["providers"]["local"] = {"type": "local", "n_threads": 1, "cache_dir": str(tmp_path / "cache"),
                                 "models": {"tiny": {"path": write_tiny_gguf(str(tmp_path / "tiny.gguf"))},
                                            "gone": {"path": str(tmp_path / "deleted.gguf")}}}
    cfg["aliases"] = {"busy-first": ["local:tiny", "oai:echo"], "gone-first": ["local:gone", "oai:echo"]}
    return make_app(cfg)


def _chat(client, model, route="/api/chat"):
    return client.post(route, json={"model": model, "stream": False, "options": {"num_predict": 4},
                                    "messages": [{"role": "user", "content": "hi there"}]})


def test_alias_fails_over_from_a_busy_local_target(app):
    client = app.test_client()
    # A queue that admits nobody: exactly the state of a full queue, without racing requests.
    app.extensions["gateway"].router.providers["local"].sched.max_queue = 0
    r = _chat(client, "local:tiny")
    assert r.status_code == 503 and "server busy" in r.json["error"]
    for route in ("/api/chat", "/v1/chat/completions"):
        r = _chat(client, "busy-first", route)
        assert r.status_code == 200, r.data
        body = r.json
        text = body["message"]["content"] if route == "/api/chat" else body["choices"][0]["message"]["content"]
        assert text == "Echo: hi there"


def test_alias_fails_over_from_a_local_model_whose_file_is_missing(app):
    client = app.test_client()
    r = _chat(client, "gone-first")
    assert r.status_code == 200, r.data
    assert r.json["message"]["content"] == "Echo: hi there"
