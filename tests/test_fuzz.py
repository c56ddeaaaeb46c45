"""Schema fuzzing of the OpenAPI spec (schemathesis): no 5xx and no stack trace, whatever the input."""

import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error

from microverse.api import create_app
from microverse.runtime import Runtime

app = create_app()
schema = schemathesis.openapi.from_asgi("/openapi.json", app)


@schemathesis.hook
def before_call(context, case, *args):
    """Keep valid generations tiny: the budget is for inputs, not for denoising."""
    if isinstance(case.body, dict) and case.path in ("/generate", "/v1/videos"):
        for key in ("num_inference_steps",):
            if isinstance(case.body.get(key), int) and case.body[key] > 1:
                case.body[key] = 1


def setup_module(module):
    import tempfile
    from pathlib import Path

    from evaluation.fake_judge import FakeJudgeServer
    from evaluation.judge import JudgeConfig
    from evaluation.judge_api import JudgeService
    from microverse.config import Settings
    from microverse.tools.tiny import save_tiny_pipeline
    from tests.synthetic_microworldbench import write_microworldbench

    tmp = tempfile.mkdtemp(prefix="microverse-fuzz-")
    app.state.runtime = Runtime.start(Settings(
        model=str(save_tiny_pipeline(f"{tmp}/model")), storage_dir=f"{tmp}/storage",
        max_pixels=32 * 32, max_frames=5, max_steps=2, max_queue=1000, max_active_per_key=1000,
        request_timeout_s=30))
    module.judge_server = FakeJudgeServer().start()
    app.state.runtime.judge = JudgeService(
        JudgeConfig(base_url=module.judge_server.base_url, api_key="x", model="fake-judge"),
        benchmark=write_microworldbench(Path(tmp) / "microworldbench"))


def teardown_module(module):
    app.state.runtime.stop()
    module.judge_server.stop()


@schema.parametrize()
@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
def test_no_server_errors(case):
    response = case.call()
    case.validate_response(response, checks=(not_a_server_error,))
    assert "Traceback" not in response.text
