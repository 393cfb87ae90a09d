"""llama.cpp's prompt-processing and decode speed on a GGUF model, measured
the same way as runtime/llm/benches/llm_speed.rs (same token ids, best of
the repetitions), as one JSON line.

    target/llamacpp/bin/python tests/benches/llama_cpp_speed.py MODEL THREADS [PROMPT DECODE REPS]

`cargo run -p xtask -- bench-llm` builds llama.cpp (llama-cpp-python from
source) and runs this beside the engine.
"""

import json
import sys
import time

import llama_cpp


def main():
    path, threads = sys.argv[1], int(sys.argv[2])
    prompt_n, decode_n, reps = (int(x) for x in (sys.argv[3:6] + ["128", "64", "3"][len(sys.argv[3:6]):]))
    llm = llama_cpp.Llama(
        model_path=path,
        n_ctx=512,
        n_batch=512,
        n_threads=threads,
        n_threads_batch=threads,
        verbose=False,
    )
    vocab = llm.n_vocab()
    prompt = [100 + (i * 7919) % (vocab - 200) for i in range(prompt_n)]
    best_prefill = best_decode = 0.0
    for _ in range(reps):
        llm.reset()
        llm._ctx.kv_cache_clear()
        t = time.perf_counter()
        llm.eval(prompt)
        best_prefill = max(best_prefill, prompt_n / (time.perf_counter() - t))
        t = time.perf_counter()
        token = 100
        for i in range(decode_n):
            llm.eval([token])
            token = 100 + (vocab + i * 31) % (vocab - 200)
        best_decode = max(best_decode, decode_n / (time.perf_counter() - t))
    print(json.dumps({
        "engine": "llama.cpp",
        "threads": threads,
        "prompt_tokens": prompt_n,
        "decode_tokens": decode_n,
        "prefill_tps": round(best_prefill, 1),
        "decode_tps": round(best_decode, 1),
    }))


if __name__ == "__main__":
    main()
