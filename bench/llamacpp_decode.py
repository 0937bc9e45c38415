# llama.cpp decode speed on a GGUF, for BENCHMARKS.md: pip install llama-cpp-python, then
#   python bench/llamacpp_decode.py SmolLM2-135M-Instruct.Q4_1.gguf
# Same prompt as bench/cpu_decode.sh; greedy; 2 threads; 128 new tokens after a 9-token prefill.
import sys, time
from llama_cpp import Llama
path = sys.argv[1]
llm = Llama(model_path=path, n_ctx=512, n_threads=2, verbose=False, seed=0)
prompt = "Once upon a time, there was a little"
toks = llm.tokenize(prompt.encode(), add_bos=False)
for rep in range(2):
    llm.reset()
    t0 = time.perf_counter()
    llm.eval(toks)
    t1 = time.perf_counter()
    n = 128
    out = []
    for i in range(n):
        tok = llm.sample(temp=0.0)
        out.append(tok)
        llm.eval([tok])
    t2 = time.perf_counter()
    print(f"prefill {len(toks)} tok: {(t1-t0)*1e3:.1f} ms; decode {n} tok: {(t2-t1):.3f} s = {n/(t2-t1):.1f} tok/s")
print(llm.detokenize(out[:32]).decode(errors='replace'))
