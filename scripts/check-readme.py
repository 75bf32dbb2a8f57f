#!/usr/bin/env python3
"""Every command the README shows still works as shown.

Collects the commands of the README's `sh` blocks and its inline code (`appliance ...`,
`cargo test -p ...`), then, for each:
- a project binary (`appliance`, `trainer`, `central`, `firmware-config`, directly or through
  `cargo run -p`): its subcommand exists and every `--flag` the README gives it appears in that
  subcommand's `--help`;
- `cargo test` / `cargo bench` with `-p`, `--test`, `--bench`, `--features`: the package, the
  target and the feature exist (`cargo metadata`);
- a script (`scripts/...`, `bench/...`): it exists and is executable.
The quick commands run for real: the provisioning sequence (keygen, provision, check, schema)
in a temporary folder. The quick start's classification is run by appliance/tests/cli.rs.

Usage: scripts/check-readme.py  (builds the binaries as the test run does first)
"""
import json
import os
import re
import shlex
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BINS = {"appliance", "trainer", "central", "firmware-config"}
BIN_PACKAGE = {b: b for b in BINS}


def readme_commands(text):
    """(line number, command) for every command of the README."""
    out = []
    in_sh, pending, start = False, "", 0
    for n, line in enumerate(text.splitlines(), 1):
        if line.startswith("```"):
            in_sh = line.strip() == "```sh"
            continue
        if in_sh:
            stripped = re.sub(r"\s+#\s.*$", "", line).rstrip()
            if not stripped or stripped.lstrip().startswith("#"):
                continue
            if not pending:
                start = n
            if stripped.endswith("\\"):
                pending += stripped[:-1] + " "
                continue
            out.append((start, pending + stripped))
            pending = ""
        else:
            for span in re.findall(r"`([^`]+)`", line):
                first = span.split()[0] if span.split() else ""
                if first in BINS and len(span.split()) > 1 or span.startswith(("cargo test", "cargo bench", "cargo run")):
                    out.append((n, span))
    return out


def tokens(cmd):
    cmd = re.sub(r"<[^>]*>", "PLACEHOLDER", cmd)
    cmd = cmd.replace("[", " ").replace("]", " ").replace("…", " ")
    cmd = re.sub(r"\s>\s*\S+", " ", cmd)  # output redirection
    return shlex.split(cmd)


def cargo_metadata():
    out = subprocess.run(
        ["cargo", "metadata", "--no-deps", "--format-version", "1", "--locked"],
        cwd=ROOT, check=True, capture_output=True, text=True,
    ).stdout
    return {p["name"]: p for p in json.loads(out)["packages"]}


def main():
    # The same targets and features as the test run before it, so that nothing is rebuilt
    # (`--bins` alone would resolve other features and build burn a second time).
    subprocess.run(
        ["cargo", "build", "--workspace", "--bins", "--tests", "--locked", "-q",
         "--features", "central/postgres"],
        cwd=ROOT, check=True,
    )
    bin_dir = os.path.join(os.environ.get("CARGO_TARGET_DIR", os.path.join(ROOT, "target")), "debug")
    packages = cargo_metadata()
    text = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    problems, checked, helps = [], 0, {}

    def help_of(binary, sub):
        key = (binary, sub)
        if key not in helps:
            r = subprocess.run([os.path.join(bin_dir, binary), sub, "--help"], capture_output=True, text=True)
            helps[key] = r.stdout if r.returncode == 0 else None
        return helps[key]

    for line, cmd in readme_commands(text):
        t = tokens(cmd)
        if not t:
            continue
        where = f"README.md:{line}: `{cmd.strip()}`"
        if t[0] == "cargo" and len(t) > 1 and t[1] in ("test", "bench"):
            if "--workspace" in t and "-p" not in t:
                checked += 1
                continue
            pkg = t[t.index("-p") + 1] if "-p" in t else None
            if pkg not in packages:
                problems.append(f"{where}: no package {pkg!r}")
                continue
            p = packages[pkg]
            for flag, kind in (("--test", "test"), ("--bench", "bench")):
                if flag in t:
                    name = t[t.index(flag) + 1]
                    if not any(tg["name"] == name and kind in tg["kind"] for tg in p["targets"]):
                        problems.append(f"{where}: {pkg} has no {kind} target {name!r}")
            if t[1] == "bench" and "--bench" not in t and not any("bench" in tg["kind"] for tg in p["targets"]):
                problems.append(f"{where}: {pkg} has no benchmark")
            if "--features" in t:
                for f in t[t.index("--features") + 1].split(","):
                    if f not in p["features"]:
                        problems.append(f"{where}: {pkg} has no feature {f!r}")
            checked += 1
            continue
        if t[0] == "cargo" and len(t) > 1 and t[1] == "run":
            if "-p" not in t or "--" not in t:
                problems.append(f"{where}: cannot tell which binary runs")
                continue
            binary, args = t[t.index("-p") + 1], t[t.index("--") + 1:]
        elif t[0] in BINS:
            binary, args = t[0], t[1:]
        elif t[0].startswith(("scripts/", "bench/")):
            path = os.path.join(ROOT, t[0])
            if not (os.path.isfile(path) and os.access(path, os.X_OK)):
                problems.append(f"{where}: {t[0]} is not an executable script")
            checked += 1
            continue
        else:
            continue
        if binary not in BINS:
            problems.append(f"{where}: {binary!r} is not one of the project's binaries")
            continue
        if not args or args[0].startswith("-"):
            problems.append(f"{where}: no subcommand")
            continue
        h = help_of(binary, args[0])
        if h is None:
            problems.append(f"{where}: `{binary} {args[0]}` is not a subcommand")
            continue
        for a in args[1:]:
            if a.startswith("--"):
                flag = a.split("=")[0]
                if not re.search(re.escape(flag) + r"(?![\w-])", h):
                    problems.append(f"{where}: `{binary} {args[0]}` has no flag {flag}")
        checked += 1

    # The provisioning sequence, for real.
    with tempfile.TemporaryDirectory() as d:
        env = dict(os.environ, PATH=bin_dir + os.pathsep + os.environ["PATH"])
        block = text.split("## Provisioning a device", 1)[1].split("```sh", 1)[1].split("```", 1)[0]
        r = subprocess.run(["bash", "-euo", "pipefail", "-c", block], cwd=d, env=env, capture_output=True, text=True)
        if r.returncode != 0:
            problems.append(f"README provisioning block failed:\n{r.stdout}{r.stderr}")
        else:
            for f in ["lab-signing.pem", "lab-signing.pem.pub", "provisioned/clinic-07-scope-1/appliance.toml",
                      "provisioned/clinic-07-scope-1/mqtt.password", "appliance.schema.json"]:
                if not os.path.isfile(os.path.join(d, f)):
                    problems.append(f"README provisioning block did not write {f}")
            json.load(open(os.path.join(d, "appliance.schema.json")))
            checked += 1

    for p in problems:
        print(p, file=sys.stderr)
    print(f"README: {checked} commands checked, {len(problems)} problems")
    sys.exit(1 if problems else 0)


if __name__ == "__main__":
    main()
