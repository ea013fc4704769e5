"""The evaluation tests' shared data: a vocabulary corpus and a small multiple-choice task."""

TEXT = "\n".join(f"the quick brown fox {i} jumps over the lazy dog number {i * 7}. hello world!" for i in range(300))
QUESTIONS = [("the quick brown", [" fox", " dog", " hello world"], 0), ("jumps over the lazy", [" fox", " dog"], 1),
             ("hello", [" world", " number 7", " quick"], 0)]
