"""`snakemake --lint` is clean, and every rule's software environment mirrors requirements.txt."""

import os
import re
import subprocess
import sys
from pathlib import Path

import yaml

from conftest import REPO_ROOT

ENV_FILE = REPO_ROOT / "workflow" / "envs" / "dfml.yaml"


def pins(lines) -> dict[str, str]:
    found = {}
    for line in lines:
        match = re.fullmatch(r"\s*([A-Za-z0-9_.\-]+)==(\S+)\s*", line)
        if match:
            found[match[1].lower()] = match[2]
    return found


def test_snakemake_lint_reports_nothing():
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    proc = subprocess.run([sys.executable, "-m", "snakemake", "--lint"], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-4000:]
    assert "Congratulations, your workflow is in a good condition!" in output, output[-4000:]


def test_every_rule_with_a_command_declares_the_shared_environment():
    for rule_file in sorted((REPO_ROOT / "workflow" / "rules").glob("*.smk")):
        for rule in re.split(r"^rule ", rule_file.read_text(), flags=re.M)[1:]:
            if "shell:" in rule:
                assert 'conda:\n        "../envs/dfml.yaml"' in rule, f"{rule_file.name}: rule {rule.split(':')[0]}"


def test_the_environment_pins_what_requirements_txt_pins():
    env = yaml.safe_load(ENV_FILE.read_text())
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    assert pins(pip) == pins((REPO_ROOT / "requirements.txt").read_text().splitlines())
    assert f"python={sys.version_info.major}.{sys.version_info.minor}" in env["dependencies"]
