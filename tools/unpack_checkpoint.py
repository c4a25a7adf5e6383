"""Unpack a checkpoint shipped xz-compressed (model.safetensors.xz + its sha256) into a loadable folder.

    python tools/unpack_checkpoint.py checkpoints/passkey_mamba2 artifacts/passkey_mamba2

The repository keeps large weights compressed: the device machine carries the whole tree, so every MiB
of it is a MiB less for data. SRC holds config.json, model.safetensors.xz and model.safetensors.sha256
(the uncompressed file's digest). DEST gets config.json and model.safetensors, checked against that
digest. A DEST already holding the same digest is left alone (a no-op), and any other DEST is refused.
Nothing here runs code from the files: xz is data, and safetensors holds only tensors.
"""
import lzma
import os
import shutil
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from engine.results import file_digest  # noqa: E402  (a file's sha256)
from tools.cli import OneLineParser  # noqa: E402

BLOCK = 1 << 20


def recorded_digest(src: str) -> str:
    path = os.path.join(src, "model.safetensors.sha256")
    try:
        words = open(path, encoding="utf-8").read().split()
    except OSError:
        raise ValueError(f"{path}: missing; a shipped checkpoint folder holds config.json, model.safetensors.xz "
                         f"and model.safetensors.sha256") from None
    if not words or len(words[0]) != 64 or any(c not in "0123456789abcdef" for c in words[0]):
        raise ValueError(f"{path}: does not start with a sha256 hex digest (64 characters 0-9a-f)")
    return words[0]


def unpack(src: str, dest: str) -> str:
    """DEST/model.safetensors from SRC/model.safetensors.xz, verified; returns 'unpacked' or 'present'."""
    want = recorded_digest(src)
    packed = os.path.join(src, "model.safetensors.xz")
    if not os.path.isfile(packed):
        raise ValueError(f"{packed}: missing (a shipped checkpoint folder holds model.safetensors.xz)")
    target = os.path.join(dest, "model.safetensors")
    if os.path.exists(target):
        if file_digest(target) == want:
            shutil.copyfile(os.path.join(src, "config.json"), os.path.join(dest, "config.json"))
            return "present"
        raise ValueError(f"{target}: exists with other weights than {packed}; remove {dest} or pick another DEST")
    os.makedirs(dest, exist_ok=True)
    part = target + ".part"
    try:
        with lzma.open(packed) as fin, open(part, "wb") as fout:
            shutil.copyfileobj(fin, fout, BLOCK)
    except lzma.LZMAError as exc:
        os.remove(part)
        raise ValueError(f"{packed}: not a readable xz file ({exc}); it is truncated or corrupt") from None
    got = file_digest(part)
    if got != want:
        os.remove(part)
        raise ValueError(f"{packed}: unpacks to sha256 {got[:16]}..., not the recorded {want[:16]}...; "
                         f"the archive or model.safetensors.sha256 is corrupt")
    shutil.copyfile(os.path.join(src, "config.json"), os.path.join(dest, "config.json"))
    os.replace(part, target)
    return "unpacked"


def main(argv=None) -> int:
    ap = OneLineParser(description=__doc__.splitlines()[0])
    ap.add_argument("src", help="the shipped folder (config.json, model.safetensors.xz, model.safetensors.sha256)")
    ap.add_argument("dest", help="where the loadable checkpoint goes (a git-ignored folder such as artifacts/)")
    args = ap.parse_args(argv)
    try:
        how = unpack(args.src, args.dest)
    except (ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"{args.dest}: {how} ({'checked against' if how == 'unpacked' else 'matches'} "
          f"{os.path.join(args.src, 'model.safetensors.sha256')})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
