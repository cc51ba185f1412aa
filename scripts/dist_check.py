"""Checks what scripts/dist.sh built (run with the dist tools' python, which has pyelftools):

    python scripts/dist_check.py DIST_DIR VERSION LIBPYTHON...

- exactly one sdist and one wheel, named for VERSION; the wheel tagged cp310-abi3-manylinux*;
- the wheel holds the abi3 _hot module and the BPF object, and that object is byte for byte the
  one in the sdist (built once, shipped in both);
- every Python C-API symbol _hot imports is exported by each LIBPYTHON given (the supported
  interpreters' libpython), so the one abi3 module loads on each of them.
"""

from __future__ import annotations

import hashlib
import io
import os
import sys
import tarfile
import zipfile

from elftools.elf.elffile import ELFFile


def fail(msg: str) -> None:
    print(f"dist-check: FAILED: {msg}", file=sys.stderr)
    sys.exit(1)


def dynamic_symbols(data: bytes, *, defined: bool) -> set[str]:
    elf = ELFFile(io.BytesIO(data))
    table = elf.get_section_by_name(".dynsym")
    names = set()
    for sym in table.iter_symbols():
        is_defined = sym["st_shndx"] != "SHN_UNDEF"
        if sym.name and is_defined == defined:
            names.add(sym.name)
    return names


def main() -> None:
    dist, version, libpythons = sys.argv[1], sys.argv[2], sys.argv[3:]
    files = sorted(os.listdir(dist))
    sdists = [f for f in files if f.endswith(".tar.gz")]
    wheels = [f for f in files if f.endswith(".whl")]
    if sdists != [f"rtml_ebpf-{version}.tar.gz"]:
        fail(f"want one sdist rtml_ebpf-{version}.tar.gz in {dist}, have {sdists}")
    if len(wheels) != 1:
        fail(f"want one wheel in {dist}, have {wheels}")
    wheel = wheels[0]
    name, ver, py, abi, plat = wheel[: -len(".whl")].split("-")
    if (name, ver, py, abi) != ("rtml_ebpf", version, "cp310", "abi3") or not all(
        p.startswith("manylinux") for p in plat.split(".")
    ):
        fail(f"{wheel}: want rtml_ebpf-{version}-cp310-abi3-manylinux*")

    with zipfile.ZipFile(os.path.join(dist, wheel)) as z:
        names = z.namelist()
        hot = [n for n in names if n.startswith("rtml_ebpf/_hot.")]
        if sorted(hot) != ["rtml_ebpf/_hot.abi3.so", "rtml_ebpf/_hot.pyi"]:
            fail(f"{wheel}: want rtml_ebpf/_hot.abi3.so and _hot.pyi, have {hot}")
        if [n for n in names if n.endswith(".so") and n != "rtml_ebpf/_hot.abi3.so"]:
            fail(f"{wheel}: shared objects other than _hot (grafted libraries?): {names}")
        wheel_obj = z.read("rtml_ebpf/bpf/rtml.bpf.o")
        hot_so = z.read("rtml_ebpf/_hot.abi3.so")
        wheel_meta = z.read(f"rtml_ebpf-{version}.dist-info/WHEEL").decode()
    if "Root-Is-Purelib: false" not in wheel_meta:
        fail(f"{wheel}: WHEEL says purelib: {wheel_meta}")
    with tarfile.open(os.path.join(dist, sdists[0])) as t:
        member = t.extractfile(f"rtml_ebpf-{version}/rtml_ebpf/bpf/rtml.bpf.o")
        if member is None:
            fail("the sdist has no rtml_ebpf/bpf/rtml.bpf.o")
            return
        sdist_obj = member.read()
        if t.extractfile(f"rtml_ebpf-{version}/rtml_ebpf/bpf/SOURCES.sha256") is None:
            fail("the sdist has no rtml_ebpf/bpf/SOURCES.sha256")
    if wheel_obj != sdist_obj:
        fail("the wheel's BPF object differs from the sdist's")

    imported = {s for s in dynamic_symbols(hot_so, defined=False) if s.startswith(("Py", "_Py"))}
    for lib in libpythons:
        with open(lib, "rb") as f:
            exported = dynamic_symbols(f.read(), defined=True)
        missing = sorted(imported - exported)
        if missing:
            fail(f"_hot.abi3.so imports {missing}, which {lib} does not export")
    digest = hashlib.sha256(sdist_obj).hexdigest()[:16]
    print(f"dist-check: ok: {wheel} and {sdists[0]}; one BPF object (sha256 {digest}...) in both; "
          f"_hot imports {len(imported)} C-API symbols, all exported by {len(libpythons)} interpreters")


if __name__ == "__main__":
    main()
