"""`mm-llama data {demo,pack,curate}`: write the demo data set, pack your own files into shards, curate."""
from __future__ import annotations

import argparse
import importlib
import json
import sys


def _curate_module():
    try:
        return importlib.import_module("mm_llama.curate.command")
    except ModuleNotFoundError as e:
        if e.name in ("mm_llama.curate", "mm_llama.curate.command"):
            return None
        raise


def configure(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="data_command", metavar="{demo,pack,curate,rejection-sample}", required=True)

    demo = sub.add_parser("demo", help="write the built-in demo data set (offline, deterministic)")
    demo.add_argument("out", help="output folder, e.g. data/demo")
    demo.add_argument("--modalities", nargs="+", default=None, help="which modalities to write (default: all); e.g. text")

    pack = sub.add_parser("pack", help="turn your own files into shards")
    kinds = pack.add_subparsers(dest="modality", metavar="MODALITY", required=True)
    text = kinds.add_parser("text", help="folders of .txt/.md files and JSONL files -> text shards")
    text.add_argument("--input", nargs="+", required=True, help="folders, .txt, .md or .jsonl files")
    text.add_argument("--out", required=True, help="output folder")
    text.add_argument("--field", default="text", help="JSONL field holding the text (default: text)")
    text.add_argument("--shard-size", default="64MB", help="target shard size, e.g. 64MB, 1GB (default: 64MB)")
    text.add_argument("--prefix", default="train", help="shard name prefix (default: train)")
    speech = kinds.add_parser("speech", help="a folder of audio files (+ TSV/JSONL transcripts) -> speech shards")
    speech.add_argument("--audio", required=True, help="folder of .wav/.flac/.ogg files")
    speech.add_argument("--out", required=True, help="output folder")
    speech.add_argument("--transcripts", help="TSV or JSONL with audio, transcript, task, language, translation, response")
    speech.add_argument("--language", help="language of every utterance, when the transcripts do not say")
    speech.add_argument("--task", choices=["asr", "ast", "dialogue"], help="task of every utterance, when not given")
    speech.add_argument("--shard-size", default="256MB", help="target shard size (default: 256MB)")
    speech.add_argument("--prefix", default="train", help="shard name prefix (default: train)")

    rs = sub.add_parser("rejection-sample", help="sample K replies per prompt, keep the reward model's best as SFT shards")
    rs.add_argument("config", help="a rejection-sampling config (configs/post/...)")
    rs.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. samples_per_prompt=4")

    image = kinds.add_parser("image", help="a folder of images (+ TSV/JSONL captions and questions) -> image shards")
    image.add_argument("--images", required=True, help="folder of .jpg/.png/.webp/.gif files")
    image.add_argument("--out", required=True, help="output folder")
    image.add_argument("--captions", help="TSV (image, caption[, question, answer, type]) or JSONL (image, caption, qa); "
                                          "default: a .txt beside each image")
    image.add_argument("--shard-size", default="256MB", help="target shard size (default: 256MB)")
    image.add_argument("--prefix", default="train", help="shard name prefix (default: train)")

    inter = kinds.add_parser("interleaved", help="Markdown files with ![](image) links and OBELICS-style JSONL "
                                                 "(texts/images lists) -> interleaved image-text document shards")
    inter.add_argument("--input", nargs="+", required=True, help="folders, .md or .jsonl files; image paths are "
                                                                 "relative to the file naming them")
    inter.add_argument("--out", required=True, help="output folder")
    inter.add_argument("--shard-size", default="256MB", help="target shard size (default: 256MB)")
    inter.add_argument("--prefix", default="train", help="shard name prefix (default: train)")

    video = kinds.add_parser("video", help="folders of frames or video files (+ TSV/JSONL captions and questions) "
                                           "-> video shards")
    video.add_argument("--videos", required=True, help="folder holding one sub-folder of frame images per video, or video "
                                                       "files (these need the optional PyAV: pip install av)")
    video.add_argument("--out", required=True, help="output folder")
    video.add_argument("--captions", help="TSV (video, caption[, question, answer, type]) or JSONL (video, caption, qa); "
                                          "default: a <name>.txt beside each video")
    video.add_argument("--max-frames", type=int, default=64, help="frames stored per video, sampled uniformly (default: 64)")
    video.add_argument("--shard-size", default="256MB", help="target shard size (default: 256MB)")
    video.add_argument("--prefix", default="train", help="shard name prefix (default: train)")

    help_text = "filter and deduplicate text shards"
    module = _curate_module()
    if module is not None:
        module.configure(sub.add_parser("curate", help=help_text))
    else:  # not built: accept any arguments, options included, so `run` can say so
        sub.add_parser("curate", help=help_text, prefix_chars="\0", add_help=False).add_argument("rest", nargs="*")


def run(args) -> int:
    if args.data_command == "demo":
        from ..data.demo import write_demo

        for part in write_demo(args.out, args.modalities):
            counts = ", ".join(f"{k} {v}" for k, v in part.counts.items())
            print(f"{part.modality}: {counts} -> {args.out}/{part.modality}/")
        print(f"wrote {args.out}/README.md")
        return 0
    if args.data_command == "rejection-sample":
        from ..config import load_config
        from ..post.rejection_sampling import RejectionSamplingConfig, run_rejection_sampling

        summary = run_rejection_sampling(load_config(RejectionSamplingConfig, args.config, args.overrides))
        print(json.dumps(summary, indent=2))
        return 0
    if args.data_command == "pack" and args.modality == "speech":
        from ..data.pack import parse_size
        from ..data.speech import pack_speech

        report = pack_speech(args.audio, args.out, args.transcripts, language=args.language, task=args.task,
                             shard_size=parse_size(args.shard_size), prefix=args.prefix)
        for problem in report.problems:
            print(f"skipped: {problem}", file=sys.stderr)
        skipped = report.skipped_text()
        print(f"{report.utterances} utterances, {report.seconds:.1f} s of audio in {len(report.shards)} shards "
              f"under {args.out}; skipped: {skipped}")
        return 0 if report.utterances else 1
    if args.data_command == "pack" and args.modality == "image":
        from ..data.pack import parse_size
        from ..data.pack_vision import pack_image

        report = pack_image(args.images, args.out, args.captions, shard_size=parse_size(args.shard_size), prefix=args.prefix)
        for problem in report.problems:
            print(f"skipped: {problem}", file=sys.stderr)
        skipped = report.skipped_text()
        print(f"{report.images} images in {len(report.shards)} shards under {args.out} ({report.renamed} stored under "
              f"their real format's extension); skipped: {skipped}")
        return 0 if report.images else 1
    if args.data_command == "pack" and args.modality == "interleaved":
        from ..data.pack import parse_size
        from ..data.pack_vision import pack_interleaved

        report = pack_interleaved(args.input, args.out, shard_size=parse_size(args.shard_size), prefix=args.prefix)
        for problem in report.problems:
            print(f"skipped: {problem}", file=sys.stderr)
        print(f"{report.documents} documents, {report.images} images in {len(report.shards)} shards under {args.out} "
              f"({report.renamed} stored under their real format's extension); skipped: {report.skipped_text()}")
        return 0 if report.documents else 1
    if args.data_command == "pack" and args.modality == "video":
        from ..data.pack import parse_size
        from ..data.pack_video import MissingExtra, pack_video

        try:
            report = pack_video(args.videos, args.out, args.captions, max_frames=args.max_frames,
                                shard_size=parse_size(args.shard_size), prefix=args.prefix)
        except MissingExtra as e:  # a video file without PyAV
            print(f"error: {e}", file=sys.stderr)
            return 2
        for problem in report.problems:
            print(f"skipped: {problem}", file=sys.stderr)
        skipped = report.skipped_text()
        print(f"{report.videos} videos, {report.frames} frames in {len(report.shards)} shards under {args.out}; "
              f"skipped: {skipped}")
        return 0 if report.videos else 1
    if args.data_command == "pack":
        from ..data.pack import pack_text, parse_size

        report = pack_text(args.input, args.out, args.field, parse_size(args.shard_size), args.prefix)
        for problem in report.problems:
            print(f"skipped: {problem}", file=sys.stderr)
        print(
            f"{report.documents} documents, {report.bytes} bytes of text in {len(report.shards)} shards "
            f"under {args.out}; skipped {report.skipped_files} unreadable files, {report.skipped_records} records"
        )
        return 0 if report.documents else 1
    module = _curate_module()
    if module is None:
        print("mm-llama data curate: not built yet in this version of mm_llama.", file=sys.stderr)
        return 2
    return int(module.run(args) or 0)
