"""The generated docs stay in step with the settings they come from."""
import os

from blazewsgi.config import markdown_reference

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_readme_reference_is_generated_from_settings():
    with open(os.path.join(ROOT, "README.md")) as f:
        text = f.read()
    start = text.index("<!-- config-reference:start -->\n") + len("<!-- config-reference:start -->\n")
    end = text.index("<!-- config-reference:end -->")
    assert text[start:end] == markdown_reference(), "run: python -m blazewsgi.config --markdown"


def test_readme_test_command_is_what_ci_runs():
    with open(os.path.join(ROOT, "README.md")) as f:
        readme = f.read()
    with open(os.path.join(ROOT, ".ci", "run")) as f:
        ci = f.read()
    command = ".venv/bin/python -m pytest -q tests"
    assert f"bash .ci/setup && {command}" in readme
    assert ci.strip().splitlines()[-2:] == ["bash .ci/setup", command]


def test_our_c_builds_with_werror():
    with open(os.path.join(ROOT, "build_ffi.py")) as f:
        src = f.read()
    for flag in ("-Wall", "-Wextra", "-Werror"):
        assert f'"{flag}"' in src
