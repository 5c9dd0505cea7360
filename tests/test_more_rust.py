"""More Rust: crates of another Debian release through private apt lists, and Rust's own sources with
their UI tests' annotations as compile tags."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest

from ternchat.config import load_config
from ternchat.data import debian
from ternchat.data.corpus import build_corpus, choose_val_crates, discover_files, pinned_val_crates
from ternchat.data.errors import DataError
from ternchat.data.rustc_src import ORIGIN, UI_ORIGIN, expected_outcome
from ternchat.data.samples import COMPILE_TAGS, document_tags
from ternchat.verify.checked_data import verify_corpus


@pytest.mark.parametrize("text, auxiliary, tag, edition", [
    ("//@ check-pass\nfn main() {}\n", False, "compiles", "2015"),
    ("//@ run-pass\n//@ edition:2021\nfn main() {}\n", False, "compiles", "2021"),
    ("//@ run-fail\n//@ edition: 2018\nfn main() { panic!() }\n", False, "compiles", "2018"),
    ("// build-pass\nfn main() {}\n", False, "compiles", "2015"),  # the directive form of older rustc
    ("fn main() { let x: u8 = 256; //~ ERROR literal out of range\n}\n", False, "fails", "2015"),
    ("//@ check-pass\n//@ revisions: a b\nfn f() {} //[a]~^ ERROR oops\n", False, "fails", "2015"),
    ("//@ build-fail\nfn main() {}\n", False, "fails", "2015"),
    ("fn main() {}\n", False, "fails", "2015"),  # a UI test without a pass mode expects errors
    ("pub fn helper() {}\n", True, "compiles", "2015"),  # auxiliary/: a crate the tests link
    ("// this test checks that run-pass is not a mode when it is prose\nfn main() {}\n", False, "fails", "2015"),
])
def test_ui_annotations_map_to_compile_tags(text, auxiliary, tag, edition):
    assert expected_outcome(text, auxiliary) == (tag, edition)


def _rustc_tree(root: Path) -> list[tuple[Path, str]]:
    """A miniature of the unpacked rustc source: a library crate and three UI tests."""
    (root / "library/alloc/src").mkdir(parents=True)
    (root / "library/alloc/Cargo.toml").write_text('[package]\nname = "alloc"\nversion = "0.0.0"\nedition = "2021"\n')
    (root / "library/alloc/src/lib.rs").write_text(
        "//! Allocation.\n\n/// A boxed value, for the tests.\npub struct Boxed<T> {\n    pub value: T,\n}\n\n"
        "impl<T: Clone> Boxed<T> {\n    pub fn get(&self) -> T {\n        self.value.clone()\n    }\n}\n")
    ui = root / "tests/ui"
    (ui / "traits/auxiliary").mkdir(parents=True)
    (ui / "traits/impl-for-ref.rs").write_text(
        "//@ run-pass\n//@ edition:2021\ntrait Area { fn area(&self) -> f64; }\nstruct Square(f64);\n"
        "impl Area for Square { fn area(&self) -> f64 { self.0 * self.0 } }\n"
        "fn main() { assert_eq!(Square(2.0).area(), 4.0); }\n")
    (ui / "traits/missing-impl.rs").write_text(
        "trait Area { fn area(&self) -> f64; }\nstruct Circle;\nfn needs<T: Area>(_: T) {}\n"
        "fn main() {\n    needs(Circle); //~ ERROR the trait bound `Circle: Area` is not satisfied\n}\n")
    (ui / "traits/auxiliary/shapes.rs").write_text("pub trait Shape { fn sides(&self) -> u32; }\n"
                                                  "pub struct Triangle;\nimpl Shape for Triangle {\n"
                                                  "    fn sides(&self) -> u32 { 3 }\n}\n")
    return [(root / "library", ORIGIN), (ui, UI_ORIGIN)]


def test_rustc_sources_are_train_only_and_their_tests_arrive_tagged(tmp_path, fixture_crates):
    roots = [*_rustc_tree(tmp_path / "rustc"), (fixture_crates, "test")]
    cfg = load_config(overrides=["data.val_fraction=0.2", "data.min_file_bytes=16"])
    summary = build_corpus(cfg.data, discover_files(roots), roots, tmp_path / "corpus")
    train, val = (set(summary["splits"][s]["crates"]) for s in ("train", "val"))
    assert {"rustc:alloc", "rustc:traits"} <= train and not any(c.startswith("rustc:") for c in val)
    docs = [json.loads(line) for line in (tmp_path / "corpus" / "train.jsonl").open()]
    expect = {d["path"]: (d.get("expect"), d["edition"]) for d in docs if d["crate"] == "rustc:traits"}
    assert expect == {"impl-for-ref.rs": ("compiles", "2021"), "missing-impl.rs": ("fails", "2015"),
                      "auxiliary/shapes.rs": ("compiles", "2015")}

    # the corpus step writes the asserted tags; the other documents wait, unchecked, for `data verify`
    n_train = summary["splits"]["train"]["files"]
    tags = [COMPILE_TAGS[i] for i in document_tags(tmp_path / "corpus", "train", n_train)]
    assert [t for d, t in zip(docs, tags) if d["crate"] == "rustc:traits"] == [
        expect[d["path"]][0] for d in docs if d["crate"] == "rustc:traits"]
    assert all(t == "unchecked" for d, t in zip(docs, tags) if not d.get("expect"))


def test_verify_keeps_the_asserted_tags_without_running_rustc(tmp_path, monkeypatch):
    roots = _rustc_tree(tmp_path / "rustc")
    for name, op in (("double", "x * 2"), ("square", "x * x")):
        (tmp_path / "other" / name).mkdir(parents=True)
        (tmp_path / "other" / name / "lib.rs").write_text(f"pub fn {name}(x: u32) -> u32 {{\n    {op}\n}}\n")
    roots.append((tmp_path / "other", "test"))
    cfg = load_config(overrides=["data.val_fraction=0.2", "data.min_file_bytes=16"])
    build_corpus(cfg.data, discover_files(roots), roots, tmp_path / "corpus")
    checked = []
    monkeypatch.setattr("ternchat.verify.checked_data.tag_source",
                        lambda text, edition, limits: checked.append(text) or {"tag": "parses", "codes": []})
    counts = verify_corpus(tmp_path / "corpus", tmp_path / "verify", workers=1)
    assert counts["compiles"] == 2 and counts["fails"] == 1
    assert len(checked) == counts["parses"] == 3  # rustc:alloc's file and the other two crates', nothing else


def test_a_whole_debian_corpus_keeps_todays_val_crates():
    pinned = pinned_val_crates()
    assert len(pinned) == 41 and {"regex-automata", "base64", "cargo"} <= pinned
    sizes = {**{c: 1000 for c in pinned}, **{f"new-crate-{i}": 5000 for i in range(400)}, "rustc:core": 10 ** 6}
    everything = load_config(overrides=['data.debian_crates="all"']).data
    assert choose_val_crates(everything, sizes) == pinned
    curated = load_config().data  # the curated corpus draws its val crates as before, rustc's never
    val = choose_val_crates(curated, sizes)
    assert "rustc:core" not in val and val != pinned
    with pytest.raises(DataError, match="never in val"):
        choose_val_crates(curated, {"rustc:core": 10, "rustc:std": 10, "only": 10})


def _sources_digest() -> str:
    digest = hashlib.sha256()
    for path in sorted([Path("/etc/apt/sources.list"), *Path("/etc/apt/sources.list.d").glob("*")]):
        if path.is_file():
            digest.update(path.read_bytes())
    return digest.hexdigest()


def test_another_release_comes_through_private_lists(tmp_path, monkeypatch):
    """Debian 13's smallvec through a private apt state: the system's sources stay as they were, the
    crate's origin and provenance name the release, and the corpus takes it beside the fixtures."""
    required = os.environ.get("TERNCHAT_REQUIRE_DEBIAN") == "1"
    if (shutil.which("apt-get") is None or not debian.DEBIAN_KEYRING.exists()) and not required:
        pytest.skip("needs apt-get and Debian's archive keyring")
    before = _sources_digest()
    package_list = tmp_path / "packages.txt"
    package_list.write_text("librust-smallvec-dev\n")
    from ternchat.data.pipeline import resolve_roots

    cfg = load_config(overrides=['data.debian_releases=["trixie"]', "data.auto_discover=false",
                                 f"data.debian_crates={json.dumps(str(package_list))}"])
    try:
        roots = resolve_roots(cfg, tmp_path / "home")
    except DataError as e:
        if required:
            raise
        pytest.skip(f"cannot reach Debian's trixie lists: {e}")
    assert _sources_digest() == before
    [(root, origin)] = roots
    assert origin == "debian:trixie" and "releases/trixie/unpacked" in root.as_posix()
    package = debian.package_of_root(root)
    assert package["release"] == "trixie" and package["package"] == "librust-smallvec-dev"
    files = discover_files(roots)
    assert files and {f.crate for f in files} == {"smallvec"} and all(f.origin == "debian:trixie" for f in files)
    with pytest.raises(DataError, match="not a Debian release codename"):
        debian.release_apt("Trixie; rm -rf", tmp_path / "home", cfg.data.debian_mirror)
