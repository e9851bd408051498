"""The optional parts are optional: a bot that imports the session API runs without the UI, the server, the
bench or Redis installed, and a command whose part is missing says which extra to install."""

import subprocess
import sys

import pytest

BLOCK = "import sys\nfor m in {mods!r}: sys.modules[m] = None  # as if not installed\n"
FACES = ("textual", "matplotlib", "fastapi", "uvicorn", "sse_starlette", "redis", "httpx")


def run(code: str, blocked=FACES) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", BLOCK.format(mods=blocked) + code], capture_output=True, text=True,
                          timeout=300)  # fmt: skip


def test_a_bot_needs_none_of_the_faces(tiny_folder):
    code = (
        "from chatrt import ChatRuntime, Config\n"
        f"config = Config().with_values(model={{'source': {str(tiny_folder)!r}, 'dtype': 'float32'}},\n"
        "                               generation={'max_new_tokens': 4})\n"
        "with ChatRuntime.from_config(config) as rt:\n"
        "    s = rt.open_session('Be brief.')\n"
        "    s.send('hello'); print('turns', s.send('again').stats.reused_session_tokens > 0)\n"
    )
    done = run(code)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "turns True"


@pytest.mark.parametrize(
    ("argv", "extra"),
    [(["serve"], "serve"), (["bench"], "bench"), (["loadtest"], "serve"), (["stats", "--redis", "redis://x"], "redis")],
)
def test_a_command_whose_part_is_missing_names_the_extra(argv, extra):
    """(`chatrt chat` needs Textual only on a terminal; piped, it is the plain chat, which does not.)"""
    done = run(f"from chatrt.cli import main\nraise SystemExit(main({argv!r}))")
    assert done.returncode == 2, done.stderr
    assert f"chatrt[{extra}]" in done.stderr and "Traceback" not in done.stderr


def test_redis_configured_without_its_client_is_a_config_error(tiny_folder):
    code = (
        "from chatrt import ChatRuntime, Config, ConfigError\n"
        f"config = Config().with_values(model={{'source': {str(tiny_folder)!r}}}, tiers={{'redis_url': 'redis://x'}})\n"
        "try:\n    ChatRuntime.from_config(config)\nexcept ConfigError as e:\n    print(e)\n"
    )
    done = run(code)
    assert "chatrt[redis]" in done.stdout, done.stderr
