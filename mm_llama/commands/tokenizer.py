"""`mm-llama tokenizer train --input PATH [PATH ...] --vocab-size N --out FILE [--field text]`."""
from __future__ import annotations


def configure(p):
    sub = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    train = sub.add_parser("train", help="train byte-level BPE ranks on your text; write a tokenizer.model file")
    train.add_argument("--input", nargs="+", required=True, metavar="PATH",
                       help=".txt/.md/.jsonl files, or folders of them")
    train.add_argument("--vocab-size", type=int, required=True, metavar="N",
                       help="number of BPE ranks (>= 256); 256 special tokens come on top")
    train.add_argument("--out", required=True, metavar="FILE", help="where to write the tokenizer.model file")
    train.add_argument("--field", default="text", help="the text field of JSONL records (default: text)")


def run(args) -> int:
    from ..text import load_tokenizer, train_tokenizer_from_files
    from ..text.bpe_train import iter_texts

    out = train_tokenizer_from_files(args.input, args.vocab_size, args.out, text_field=args.field)
    tok = load_tokenizer(out)
    chars = tokens = 0
    for text in iter_texts(args.input, args.field):
        chars += len(text)
        tokens += len(tok.encode(text, bos=False, eos=False))
    print(f"wrote {out}")
    print(f"  BPE ranks:            {tok.n_ranks}")
    print(f"  special-token base:   {tok.n_ranks} (<|begin_of_text|>); n_words = {tok.n_words}")
    print(f"  chars/token (train):  {chars / max(tokens, 1):.3f}  ({chars:,} chars, {tokens:,} tokens)")
    return 0
