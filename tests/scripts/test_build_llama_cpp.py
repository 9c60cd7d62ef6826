"""The llama.cpp build reports its progress (issue 32 N8: it was silent for 10+ minutes)."""

from scripts.build_llama_cpp import progress_lines


def test_compile_progress_is_reported_every_tenth_and_the_tail_kept():
    lines = ["ninja: Entering directory `build'\n"] + [f"[{i}/300] Building CXX object x{i}.o\n" for i in range(1, 301)]
    said = []
    tail = progress_lines(iter(lines), said.append)
    assert said == [f"compiled {30 * k}/300 ({10 * k}%)" for k in range(1, 11)]
    assert len(tail) == 40 and tail[-1] == "[300/300] Building CXX object x300.o\n"
    assert progress_lines(iter(["error: no such target\n"]), said.append) == ["error: no such target\n"]
