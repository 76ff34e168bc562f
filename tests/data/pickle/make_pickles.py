#!/usr/bin/env python3
"""Generates the test files for tests/pickle_reader.rs.

Real torch.save outputs need torch (run with a Python that has it, e.g. /work/fixtures-venv);
the hostile and broken files are written byte by byte and are never unpickled here.
Values are small arange-based tensors so the Rust tests can check exact numbers.

    python make_pickles.py            # writes next to this script
"""
import io
import os
import random
import struct
import zipfile

HERE = os.path.dirname(os.path.abspath(__file__))


def out(name, data):
    with open(os.path.join(HERE, name), "wb") as f:
        f.write(data)


# ---------------------------------------------------------------------------------------------
# Hand-written pickle opcodes (protocol 2), enough to mimic torch's data.pkl exactly.
# ---------------------------------------------------------------------------------------------

def s(text):  # BINUNICODE
    b = text.encode()
    return b"X" + struct.pack("<I", len(b)) + b


def i(n):  # BININT1 / BININT
    return b"K" + bytes([n]) if 0 <= n < 256 else b"J" + struct.pack("<i", n)


def tup(*items):
    return b"(" + b"".join(items) + b"t"


def glob(module, name):
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def tensor_v2(storage_type, key, numel, offset, size, stride):
    pid = tup(s("storage"), glob("torch", storage_type), s(key), s("cpu"), i(numel))
    return (glob("torch._utils", "_rebuild_tensor_v2")
            + tup(pid + b"Q", i(offset), tup(*map(i, size)), tup(*map(i, stride)), b"\x89",
                  glob("collections", "OrderedDict") + b")R")
            + b"R")


def dict_of(pairs):
    return b"}(" + b"".join(k + v for k, v in pairs) + b"u"


def pickle(body):
    return b"\x80\x02" + body + b"."


def torch_zip(pkl, storages=None, prefix="archive", byteorder=b"little", with_pkl=True,
              compression=zipfile.ZIP_STORED):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=compression) as z:
        if with_pkl:
            z.writestr(f"{prefix}/data.pkl", pkl)
        if byteorder is not None:
            z.writestr(f"{prefix}/byteorder", byteorder)
        for key, data in (storages or {}).items():
            z.writestr(f"{prefix}/data/{key}", data)
        z.writestr(f"{prefix}/version", b"3\n")
    return buf.getvalue()


def f32(values):
    return struct.pack(f"<{len(values)}f", *values)


def hand_made():
    # os.system via GLOBAL + REDUCE inside an otherwise torch-shaped archive. NEVER load it.
    evil = pickle(dict_of([(s("alpha"), glob("os", "system") + tup(s("echo pwned")) + b"R")]))
    out("malicious_os_system.pt", torch_zip(evil))
    # builtins.eval via STACK_GLOBAL (protocol 4 style), as a raw pickle stream (no zip).
    evil2 = (b"\x80\x04" + b"\x8c\x08builtins" + b"\x8c\x04eval" + b"\x93"
             + b"\x8c\x0a1+1\x85" + b"R.")
    out("malicious_eval.pkl", evil2)

    # A tensor of 10 elements over a storage of 4.
    pkl = pickle(dict_of([(s("w"), tensor_v2("FloatStorage", "0", 4, 0, [10], [1]))]))
    out("extent_past_storage.pt", torch_zip(pkl, {"0": f32([1, 2, 3, 4])}))
    # The storage entry holds fewer bytes than the pickle declares.
    pkl = pickle(dict_of([(s("w"), tensor_v2("FloatStorage", "0", 4, 0, [4], [1]))]))
    out("storage_short.pt", torch_zip(pkl, {"0": f32([1, 2, 3])}))
    # A referenced storage that is not in the archive.
    out("storage_missing.pt", torch_zip(pkl, {}))
    # A zip without data.pkl.
    out("no_data_pkl.pt", torch_zip(b"", {"0": f32([1, 2, 3, 4])}, with_pkl=False))
    # Big-endian data is refused.
    out("big_endian.pt", torch_zip(pkl, {"0": f32([1, 2, 3, 4])}, byteorder=b"big"))
    # Any top-level folder name works; storages may be deflated.
    out("deflated.pt", torch_zip(pkl, {"0": f32([1, 2, 3, 4])}, prefix="my model",
                                compression=zipfile.ZIP_DEFLATED))
    # Random bytes behind a PROTO opcode.
    rng = random.Random(1234)
    out("random.bin", b"\x80" + bytes(rng.randrange(256) for _ in range(512)))


def with_torch():
    import torch

    base = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    sd = {
        "f32": torch.arange(6, dtype=torch.float32).reshape(2, 3) / 4,
        "f16": torch.tensor([0.5, -1.25, 3.0], dtype=torch.float16),
        "bf16": torch.tensor([[1.5, -2.0], [0.25, 8.0]], dtype=torch.bfloat16),
        "alpha": torch.tensor(4.0),
        # Views of one storage: the base, its transpose, a row slice (offset 4) and a column
        # (offset 1, stride 4).
        "base": base,
        "base_t": base.t(),
        "rows_1_2": base[1:],
        "col_1": base[:, 1],
        "param": torch.nn.Parameter(torch.tensor([7.0, 8.0])),
        "i64": torch.tensor([-3, 5], dtype=torch.int64),
    }
    buf = io.BytesIO()
    torch.save(sd, buf)
    data = buf.getvalue()
    out("state_dict.pt", data)
    out("truncated.pt", data[: len(data) // 2])

    ckpt = {
        "state_dict": {"model.w": torch.tensor([1.0, 2.0]), "model.b": torch.tensor(0.5)},
        "global_step": 5,
        "epoch": 1,
    }
    buf = io.BytesIO()
    torch.save(ckpt, buf)
    out("a1111.ckpt", buf.getvalue())

    nested = {"model": {"layer": {"w": torch.tensor([1.0, -1.0])}, "b": torch.tensor([2.0])},
              "name": "x", "lr": 0.1}
    buf = io.BytesIO()
    torch.save(nested, buf)
    out("nested.pt", buf.getvalue())

    legacy = {"w": base.t(), "alpha": torch.tensor(2.0, dtype=torch.float16)}
    buf = io.BytesIO()
    torch.save(legacy, buf, _use_new_zipfile_serialization=False)
    out("legacy.pt", buf.getvalue())


if __name__ == "__main__":
    hand_made()
    try:
        import torch  # noqa: F401
    except ImportError:
        print("torch not installed: kept the existing torch-made files")
    else:
        with_torch()
