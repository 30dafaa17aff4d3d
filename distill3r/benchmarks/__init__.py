"""Public benchmarks (7-Scenes, NRGBD, DTU, CO3Dv2, and the built-in demo scenes) with
Fast3R's protocols: readers in the published layouts (``readers``), seeded frame selection
(``sample``), each benchmark's defaults and published numbers (``protocols``), the model
interface the student, the Fast3R teacher and the baselines implement (``models``), and the
stage's runner and Markdown tables (``runner``)."""

from distill3r.benchmarks.models import MODELS, BenchModel, build_model
from distill3r.benchmarks.protocols import PROTOCOLS, resolve
from distill3r.benchmarks.runner import format_tables, run_benchmarks
from distill3r.benchmarks.sample import BenchFrame, BenchSample, BenchScene, load_sample

__all__ = ["MODELS", "PROTOCOLS", "BenchFrame", "BenchModel", "BenchSample", "BenchScene",
           "build_model", "format_tables", "load_sample", "resolve", "run_benchmarks"]
