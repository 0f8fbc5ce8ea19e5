import pytest

from sglang_mx.sglang import unidiff

DIFF = """header text is ignored
--- a/pkg/mod.py
+++ b/pkg/mod.py
@@ -1,3 +1,4 @@
 def f():
-    return 1
+    import x
+    return x.f()
 
@@ -6,2 +7,2 @@
 def g():
-    return 2
\\ No newline at end of file
+    return 3
\\ No newline at end of file
"""
ORIGINAL = "def f():\n    return 1\n\n\n\ndef g():\n    return 2"
PATCHED = "def f():\n    import x\n    return x.f()\n\n\n\ndef g():\n    return 3"


def test_parse_strips_one_component_and_reads_hunks():
    [fp] = unidiff.parse(DIFF)
    assert fp.path == "pkg/mod.py"
    assert [(h.old_start, h.new_start, len(h.old), len(h.new)) for h in fp.hunks] == [(1, 1, 3, 4), (6, 7, 2, 2)]


def test_apply_and_reverse_are_exact():
    [fp] = unidiff.parse(DIFF)
    assert unidiff.apply(ORIGINAL, fp) == PATCHED
    assert unidiff.apply(PATCHED, fp.reversed()) == ORIGINAL


def test_changed_context_is_a_conflict_naming_file_hunk_and_line():
    [fp] = unidiff.parse(DIFF)
    with pytest.raises(unidiff.HunkConflict) as e:
        unidiff.apply(ORIGINAL.replace("def g", "def h"), fp)
    assert str(e.value) == "pkg/mod.py: hunk 2 does not match at line 6: expected 'def g():\\n', found 'def h():\\n'"


def test_no_offset_search_a_shifted_file_conflicts():
    [fp] = unidiff.parse(DIFF)
    with pytest.raises(unidiff.HunkConflict):
        unidiff.apply("# one more line\n" + ORIGINAL, fp)


def test_whitespace_and_line_endings_must_match():
    [fp] = unidiff.parse(DIFF)
    with pytest.raises(unidiff.HunkConflict):
        unidiff.apply(ORIGINAL.replace("\n", "\r\n"), fp)


def test_only_lf_splits_lines():
    diff = "--- a/x\n+++ b/x\n@@ -1 +1 @@\n-a\x0cb\n+c\n"
    [fp] = unidiff.parse(diff)
    assert unidiff.apply("a\x0cb\nrest\n", fp) == "c\nrest\n"


@pytest.mark.parametrize("diff, message", [
    ("nothing here", "no file headers"),
    ("--- a/x\n+++ b/x\n@@ -1,2 +1,2 @@\n a\n", "ends early"),
    ("--- a/x\n+++ b/x\n@@ -1 +1 @@\n?a\n", "unexpected '?a'"),
    ("--- /dev/null\n+++ /dev/null\n@@ -0,0 +1 @@\n+a\n", "not supported"),
    ("--- a/x\n+++ b/../x\n@@ -1 +1 @@\n-a\n+b\n", "bad path"),
])
def test_malformed_diffs_are_rejected(diff, message):
    with pytest.raises(unidiff.PatchFormatError, match=message.replace("?", r"\?")):
        unidiff.parse(diff)
