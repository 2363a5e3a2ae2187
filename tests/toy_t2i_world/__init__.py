"""The toy text-to-image world, shared by the tests and by benchmarks/toy_t2i.

`dataset` draws captioned 32x32 images of coloured shapes (with a "striped style" and a pink
square as the concept to negate), `measure` detects what is drawn from pixel statistics,
`pipeline` builds the word-level tokenizer and loads a trained pipeline folder (such as
tests/assets/toy_t2i), `figure` writes labelled PNG grids.

It lives with the tests, not in the library (it is test and benchmark support, not steering) and
not in `benchmarks/` (tests do not import the benchmarks). The scripts of benchmarks/toy_t2i
import it as `tests.toy_t2i_world`, with the repository root on sys.path (they run as
`python -m benchmarks.toy_t2i.<script>` from the root).
"""
