"""Issue 10 as a hostile user tries it, through the real commands: no file the command reads is ever
written, every output is atomic (an exclusive temporary file, then a rename) and honours the umask,
a checkpoint cannot run code, and each bad path, flag, config key, model or data file is a one-line
error with exit status 1 that leaves nothing behind."""
import errno
import json
import os
import pickle
import resource
import signal
import subprocess
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from typer.testing import CliRunner

from mfconvert.cli import finetune as finetune_cli
from mfconvert.cli.main import app
from mfconvert.convert import ConvertConfig, ShiftLinearConfig, convert_onnx
from mfconvert.convert import files

runner = CliRunner()


def mlp(rng, w1=(64, 128)) -> onnx.ModelProto:
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc1"), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("MatMul", ["r", "w2"], ["y"], name="fc2")]
    inits = [numpy_helper.from_array(rng.normal(0, .1, w1).astype(np.float32), "w1"),
             numpy_helper.from_array(rng.normal(0, .1, (128, 32)).astype(np.float32), "w2")]
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 32])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.fixture
def work(tmp_path):
    """tmp_path holding mlp.onnx (the teacher), student.onnx (its shift conversion) and x.npz (data)."""
    rng = np.random.default_rng(0)
    onnx.save(mlp(rng), tmp_path / "mlp.onnx")
    convert_onnx(str(tmp_path / "mlp.onnx"), ConvertConfig(shift_linear=ShiftLinearConfig(weight_bits=3)),
                 output=str(tmp_path / "student.onnx"))
    np.savez(tmp_path / "x.npz", x=rng.normal(size=(80, 64)).astype(np.float32))
    return tmp_path


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file() and not p.is_symlink()}


def no_temp_files(folder: Path) -> bool:
    return not [p for p in folder.rglob("*") if p.name.startswith(files.TEMP_PREFIX) or p.name.endswith(".tmp")]


def one_line_error(res, message: str, prefix: str = "mfconvert: error: ") -> None:
    assert res.exit_code == 1, res.output
    lines = res.output.strip().splitlines()
    assert lines[-1].startswith(prefix) and message in lines[-1], res.output


def convert(*args):
    return runner.invoke(app, [str(a) for a in args])


def finetune(work, *args):
    base = [work / "student.onnx", "--teacher", work / "mlp.onnx", "--data", work / "x.npz", "--steps", "2",
            "--rounding", "nearest", "--batch-size", "16"]
    return runner.invoke(finetune_cli.app, [str(a) for a in base + list(args)])


# Finding 2: side files follow the model output's rules: never a file the command reads (also
# through a symlink or a hard link), never another output, an existing file only with --force.

@pytest.mark.parametrize("flag", ["-o", "--report-json", "--save-config"])
@pytest.mark.parametrize("alias", ["same", "symlink", "hardlink"])
def test_convert_never_writes_a_file_it_reads(work, flag, alias):
    target = {"same": work / "mlp.onnx", "symlink": work / "link.onnx", "hardlink": work / "hard.onnx"}[alias]
    if alias == "symlink":
        target.symlink_to(work / "mlp.onnx")
    elif alias == "hardlink":
        os.link(work / "mlp.onnx", target)
    before = snapshot(work)
    out = [] if flag == "-o" else ["-o", work / "out.onnx"]
    res = convert(work / "mlp.onnx", *out, flag, target, "--force")
    one_line_error(res, f"{flag} {target}: refusing to overwrite the input model; choose another {flag}")
    assert snapshot(work) == before and no_temp_files(work)
    for read, label in ((work / "x.npz", "the --data file"), (work / "c.json", "the --config file")):
        (work / "c.json").write_text("{}")
        res = convert(work / "mlp.onnx", "-o", work / "out.onnx", "--data", work / "x.npz", "--config",
                      work / "c.json", "--report-json", read, "--force")
        one_line_error(res, f"--report-json {read}: refusing to overwrite {label}")
    assert not (work / "out.onnx").exists()


def test_finetune_never_writes_a_file_it_reads(work):
    before = snapshot(work)
    (work / "teacher_link.onnx").symlink_to(work / "mlp.onnx")
    os.link(work / "student.onnx", work / "student_hard.onnx")
    for flag in ("-o", "--report-json", "--checkpoint"):
        for target, label in ((work / "teacher_link.onnx", "the teacher model"),
                              (work / "student_hard.onnx", "the input model"), (work / "x.npz", "the --data file")):
            for extra in ([], ["--resume"] if flag == "--checkpoint" else [], ["--force"]):
                res = finetune(work, flag, target, *extra)
                one_line_error(res, f"{flag} {target}: refusing to overwrite {label}", "mfconvert finetune: error: ")
    assert {k: v for k, v in snapshot(work).items() if k != "student_hard.onnx"} == before and no_temp_files(work)


def test_outputs_are_distinct_and_existing_ones_need_force(work):
    res = convert(work / "mlp.onnx", "-o", work / "out.onnx", "--report-json", work / "out.onnx")
    one_line_error(res, f"--report-json {work / 'out.onnx'}: also given as -o; each output needs its own file")
    res = finetune(work, "-o", work / "ft.onnx", "--checkpoint", work / "ft.onnx")
    one_line_error(res, "also given as -o", "mfconvert finetune: error: ")
    (work / "r.json").write_text("mine")
    res = convert(work / "mlp.onnx", "-o", work / "out.onnx", "--report-json", work / "r.json")
    one_line_error(res, f"--report-json {work / 'r.json'}: already exists; pass --force to replace it")
    assert not (work / "out.onnx").exists()        # refused before converting: no model written either
    res = convert(work / "mlp.onnx", "-o", work / "out.onnx", "--report-json", work / "r.json", "--force")
    assert res.exit_code == 0 and json.loads((work / "r.json").read_text())["passes"]
    (work / "ck.pt").write_bytes(b"an older run")  # a checkpoint is replaced only with --force (or resumed)
    res = finetune(work, "-o", work / "ft.onnx", "--checkpoint", work / "ck.pt")
    one_line_error(res, "ck.pt: already exists; pass --force", "mfconvert finetune: error: ")
    assert (work / "ck.pt").read_bytes() == b"an older run" and not (work / "ft.onnx").exists()


# Finding 3: a checkpoint is tensors and plain values behind a format marker; nothing else is
# unpickled.

class RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):   # unpickling calls open(marker, "w"): creates the file
        return (open, (self.marker, "w"))


def test_a_crafted_checkpoint_runs_no_code(work):
    marker = work / "pwned"
    torch.save({"format": "mfconvert-finetune-checkpoint", "version": 2, "payload": RunsCode(str(marker))},
               work / "evil.pt")
    torch.load(work / "evil.pt", weights_only=False)     # the payload works: the old loader ran it
    assert marker.exists()
    marker.unlink()
    torch.save({"student": {}, "optimizer": {}, "step": 1, "format": 1}, work / "old.pt")   # no marker
    (work / "noise.pt").write_bytes(os.urandom(300))
    pickle.dump({"format": "mfconvert-finetune-checkpoint"}, open(work / "plain.pkl", "wb"))
    for name, why in (("evil.pt", "it holds objects other than tensors and plain values; not unpickled"),
                      ("old.pt", "no 'mfconvert-finetune-checkpoint' format marker"), ("noise.pt", ""),
                      ("plain.pkl", "")):
        res = finetune(work, "-o", work / "ft.onnx", "--checkpoint", work / name, "--resume")
        one_line_error(res, f"{work / name}: not an mfconvert checkpoint ({why}", "mfconvert finetune: error: ")
        assert not marker.exists() and not (work / "ft.onnx").exists()
    # A real one: written by a run, read back with weights_only=True, and resumed from.
    res = finetune(work, "-o", work / "ft.onnx", "--checkpoint", work / "ck.pt")
    assert res.exit_code == 0, res.output
    state = torch.load(work / "ck.pt", weights_only=True)
    assert state["format"] == "mfconvert-finetune-checkpoint" and state["step"] == 2
    res = finetune(work, "-o", work / "ft2.onnx", "--checkpoint", work / "ck.pt", "--resume", "--steps", "3")
    assert res.exit_code == 0 and "finetuned 3 steps" in res.output, res.output
    assert torch.load(work / "ck.pt", weights_only=True)["step"] == 3 and no_temp_files(work)
    # A checkpoint of another student (fc2 left float) is named as such, before training.
    convert_onnx(str(work / "mlp.onnx"), ConvertConfig(shift_linear=ShiftLinearConfig(weight_bits=3, exclude=["fc2"])),
                 output=str(work / "other.onnx"))
    res = runner.invoke(finetune_cli.app, [str(work / "other.onnx"), "--teacher", str(work / "mlp.onnx"), "--data",
                                           str(work / "x.npz"), "--checkpoint", str(work / "ck.pt"), "--resume"])
    one_line_error(res, f"{work / 'ck.pt'}: a checkpoint of another model (it differs at ", "mfconvert finetune: error: ")
    assert "finetuned" not in res.output


# Finding 4: temporary files are created exclusively, never through a planted name.

def test_a_planted_symlink_is_never_followed(work, monkeypatch):
    victim = work / "victim.txt"
    victim.write_text("precious")
    (work / "ck.pt.tmp").symlink_to(victim)             # the old fixed temporary name
    res = finetune(work, "-o", work / "ft.onnx", "--checkpoint", work / "ck.pt")
    assert res.exit_code == 0, res.output
    assert victim.read_text() == "precious" and os.readlink(work / "ck.pt.tmp") == str(victim)
    assert torch.load(work / "ck.pt", weights_only=True)["step"] == 2
    # The random name itself, planted: O_EXCL skips it and takes the next.
    names = iter(["planted", "fresh"])
    monkeypatch.setattr(files.secrets, "token_hex", lambda n: next(names))
    (work / f"{files.TEMP_PREFIX}planted.tmp").symlink_to(victim)
    files.write_text_atomic(work / "side.json", "{}")
    assert victim.read_text() == "precious" and (work / "side.json").read_text() == "{}"
    assert (work / f"{files.TEMP_PREFIX}planted.tmp").is_symlink()


# Finding 5: one-line errors naming the file, flag or input, exit 1, nothing half-written.

@pytest.fixture
def bad_inputs(work):
    rng = np.random.default_rng(1)
    model = mlp(rng)
    model.graph.initializer[0].dims[:] = [64, 127]
    onnx.save(model, work / "baddims.onnx")
    x = rng.normal(size=(40, 64)).astype(np.float32)
    np.save(work / "x63.npy", x[:, :63])
    np.save(work / "xint.npy", rng.integers(0, 5, size=(40, 64)))
    x[7, 3] = np.nan
    np.save(work / "xnan.npy", x)
    (work / "outdir").mkdir()
    return work


@pytest.mark.parametrize("args,message", [
    (["-o", "."], "-o .: is a directory; give a file path"),
    (["-o", "{w}/outdir", "--force"], "-o {w}/outdir: is a directory; give a file path"),
    (["-o", "{w}/o.onnx", "--report-json", "{w}/missing/r.json"],
     "--report-json {w}/missing/r.json: directory {w}/missing does not exist"),
    (["-o", "{w}/nodir/o.onnx"], "-o {w}/nodir/o.onnx: directory {w}/nodir does not exist"),
    (["-o", "{w}/o.onnx", "--input-shape", "x=99999999999999999999,64"],
     "--input-shape 'x=99999999999999999999,64': at most 2^40 values per input"),
    (["-o", "{w}/o.onnx", "--data", "{w}/x63.npy"],
     "{w}/x63.npy: input 'x' takes examples of shape [64] (the model's [n, 64] less the batch axis), "
     "example 0 has shape [63]"),
    (["-o", "{w}/o.onnx", "--data", "{w}/xnan.npy"],
     "{w}/xnan.npy: input 'x': example 7 holds NaN or Inf; calibration data must be finite"),
    (["-o", "{w}/o.onnx", "--data", "{w}/xint.npy"], "{w}/xint.npy: input 'x' takes float32 data, got int64"),
])
def test_bad_requests_are_one_line_errors(bad_inputs, args, message):
    w = bad_inputs
    before = snapshot(w)
    res = convert(w / "mlp.onnx", *[a.format(w=w) for a in args])
    one_line_error(res, message.format(w=w))
    assert snapshot(w) == before and no_temp_files(w) and "layers converted" not in res.output


def test_bad_initializer_and_missing_checkpoint_dir(bad_inputs):
    w = bad_inputs
    res = convert(w / "baddims.onnx", "-o", w / "o.onnx")
    one_line_error(res, f"{w / 'baddims.onnx'}: initializer 'w1' with dims [64, 127]: needs 32512 bytes of raw "
                        "data, has 32768")
    res = finetune(w, "-o", w / "ft.onnx", "--checkpoint", "/missing/dir/ck.pt")
    one_line_error(res, "--checkpoint /missing/dir/ck.pt: directory /missing/dir does not exist",
                   "mfconvert finetune: error: ")
    assert "training on" not in res.output and not (w / "ft.onnx").exists()   # refused before training
    one_line_error(finetune(w, "--resume"), "--resume needs --checkpoint", "mfconvert finetune: error: ")


def test_an_unwritable_directory_is_found_before_converting(work, monkeypatch):
    """Root writes anywhere, so the probe's failure is injected; other users also try a real
    read-only directory."""
    if os.geteuid() != 0:
        ro = work / "ro"
        ro.mkdir(mode=0o555)
        res = convert(work / "mlp.onnx", "-o", ro / "o.onnx")
        one_line_error(res, f"-o {ro / 'o.onnx'}: cannot write in {ro} (Permission denied)")

    def read_only(parent):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))
    monkeypatch.setattr(files, "create_temp", read_only)
    res = convert(work / "mlp.onnx", "-o", work / "o.onnx")
    one_line_error(res, f"-o {work / 'o.onnx'}: cannot write in {work} (Read-only file system)")
    assert not (work / "o.onnx").exists()


@pytest.mark.parametrize("where,code", [("fsync", errno.ENOSPC), ("replace", errno.EACCES)])
def test_a_failed_write_keeps_the_old_file(work, monkeypatch, where, code):
    (work / "o.onnx").write_bytes(b"the previous output")

    def fail(*args):
        raise OSError(code, os.strerror(code))
    monkeypatch.setattr(files.os, where, fail)
    res = convert(work / "mlp.onnx", "-o", work / "o.onnx", "--force")
    one_line_error(res, f"{work / 'o.onnx'}: cannot write ({os.strerror(code)})")
    assert (work / "o.onnx").read_bytes() == b"the previous output" and no_temp_files(work)


def test_a_real_file_size_limit(work):
    """A soft RLIMIT_FSIZE below the model's size with SIGXFSZ ignored: the kernel answers the
    write with a real EFBIG (in this process, for the one command; the limit is restored)."""
    out = work / "o.onnx"
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (4096, hard))
    try:
        res = convert(work / "mlp.onnx", "-o", out)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, handler)
    one_line_error(res, f"{out}: cannot write (File too large)")
    assert len(res.output.strip().splitlines()) == 1 and not out.exists() and no_temp_files(work)


@pytest.fixture
def small_mount(work):
    """mount(options) → a fresh tmpfs folder under `work` (root with CAP_SYS_ADMIN only; unmounted after)."""
    mounted = []

    def mount(options: str) -> Path:
        folder = work / f"mnt{len(mounted)}"
        folder.mkdir()
        if subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)],
                          capture_output=True).returncode:
            pytest.skip("cannot mount a tmpfs here (needs root and CAP_SYS_ADMIN)")
        mounted.append(folder)
        return folder
    yield mount
    for folder in mounted:
        subprocess.run(["umount", str(folder)], check=True)


def test_a_real_full_disk_and_a_real_read_only_mount(work, small_mount):
    full = small_mount("size=4k")                 # room for the probe, not for the model
    res = convert(work / "mlp.onnx", "-o", full / "o.onnx")
    one_line_error(res, f"{full / 'o.onnx'}: cannot write (No space left on device)")
    assert os.listdir(full) == []                 # no half-written model, no temporary file
    ro = small_mount("ro")
    res = convert(work / "mlp.onnx", "-o", ro / "o.onnx")
    one_line_error(res, f"-o {ro / 'o.onnx'}: cannot write in {ro} (Read-only file system)")
    res = finetune(work, "-o", work / "ft.onnx", "--checkpoint", ro / "ck.pt")
    one_line_error(res, f"--checkpoint {ro / 'ck.pt'}: cannot write in {ro} (Read-only file system)",
                   "mfconvert finetune: error: ")
    assert "training on" not in res.output and not (work / "ft.onnx").exists()


def test_a_failed_side_file_keeps_the_finished_model(work, monkeypatch):
    real = files.write_bytes_atomic

    def full_for_json(path, data):
        if str(path).endswith(".json"):
            raise files.WriteError(str(path), OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)))
        return real(path, data)
    monkeypatch.setattr(files, "write_bytes_atomic", full_for_json)
    res = convert(work / "mlp.onnx", "-o", work / "o.onnx", "--report-json", work / "r.json")
    one_line_error(res, f"{work / 'r.json'}: cannot write (No space left on device); the model was written to "
                        f"{work / 'o.onnx'}")
    assert onnx.load(work / "o.onnx").graph.node[0].op_type == "ShiftLinear" and not (work / "r.json").exists()
    res = finetune(work, "-o", work / "ft.onnx", "--report-json", work / "ft.json")
    one_line_error(res, f"{work / 'ft.json'}: cannot write (No space left on device); the finetuned model was "
                        f"written to {work / 'ft.onnx'}", "mfconvert finetune: error: ")
    assert onnx.load(work / "ft.onnx").graph.node and no_temp_files(work)


# Finding 7: --config JSON is validated key by key.

@pytest.mark.parametrize("config,message", [
    ({"shift_linear": {"include": "fc1"}}, "shift_linear.include must be a list of regex strings, got a string"),
    ({"shift_linear": {"exclude": ["fc1", 2]}}, "shift_linear.exclude must be a list of regex strings, got an integer at [1]"),
    ({"shift_linear": {"weight_bits": "5"}}, "shift_linear.weight_bits must be an integer, got a string"),
    ({"shift_linear": {"weight_bits": 4.5}}, "shift_linear.weight_bits must be an integer, got a number"),
    ({"shift_linear": {"min_params": True}}, "shift_linear.min_params must be an integer, got true"),
    ({"shift_linear": {"act_frac_bits_by_input": {"x": "8"}}},
     "shift_linear.act_frac_bits_by_input.x must be an integer, got a string"),
    ({"shift_linear": {"weight_bits": 9}}, "shift_linear: weight_bits must be in [2, 5], got 9"),
    ({"shift_linear": {"wieght_bits": 3}}, "shift_linear: unknown key 'wieght_bits'"),
    ({"shift_linear": "on"}, "shift_linear must be an object (or null to turn the pass off), got a string"),
    ({"moe_mlp": {"router_std": "big"}}, "moe_mlp.router_std must be a number, got a string"),
    ({"shiftlinear": {}}, "unknown config key 'shiftlinear'"),
    ([1, 2], "the config must be a JSON object, got a list"),
])
def test_config_keys_are_validated(work, config, message):
    path = work / "c.json"
    path.write_text(json.dumps(config))
    res = convert(work / "mlp.onnx", "--dry-run", "--config", path)
    one_line_error(res, f"--config {path}: {message}")
    assert len(res.output.strip().splitlines()) == 1
    path.write_text("{not json")
    one_line_error(convert(work / "mlp.onnx", "--dry-run", "--config", path), f"--config {path}: not valid JSON (")
    # A valid one still converts only what it names.
    path.write_text(json.dumps({"shift_linear": {"include": ["fc1"], "min_params": 0}, "add_attention": None}))
    res = convert(work / "mlp.onnx", "--dry-run", "--config", path)
    assert res.exit_code == 0 and "layers converted: 1" in res.output, res.output


# Finding 11: outputs get mode 0666 less the umask, like any file the user creates.

@pytest.mark.parametrize("mask", [0o022, 0o077, 0o002])
def test_outputs_honour_the_umask(work, mask):
    old = os.umask(mask)
    try:
        res = convert(work / "mlp.onnx", "-o", work / "o.onnx", "--report-json", work / "r.json",
                      "--save-config", work / "c.json")
        assert res.exit_code == 0, res.output
        res = finetune(work, "-o", work / "ft.onnx", "--checkpoint", work / "ck.pt")
        assert res.exit_code == 0, res.output
    finally:
        os.umask(old)
    for name in ("o.onnx", "r.json", "c.json", "ft.onnx", "ck.pt"):
        assert (work / name).stat().st_mode & 0o777 == 0o666 & ~mask, name
