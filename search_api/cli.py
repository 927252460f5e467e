"""The ``stella-search`` command: a thin shell over the Python API (ingest, search, eval, optimize, info, serve).

stella-search ingest corpus.jsonl --data-dir data --model minilm
stella-search search "what is a vector index" --data-dir data -k 5
stella-search eval tests/data/msmarco --model minilm
stella-search optimize --data-dir data --index auto --recall 0.95
stella-search info --data-dir data
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import sys
import time
import warnings
from pathlib import Path

import click
import httpx

from indexer.settings import CLIENT_KEY_VARIABLE, Settings, check_shards, load_settings
from search_api.client import SearchAPIError
from search_api.retrieval import DEFAULT_ALPHA, DEFAULT_FUSION, check_k, check_query
from storage.disk import storage_error
from storage.errors import StellaSearchError

log = logging.getLogger("stella_search")
DATA_DIR_KEY = "stella_search.data_dir"  # in click's context meta: the data folder of the running command

BACKEND_OPTION = click.option(
    "--backend",
    type=click.Choice(["auto", "torch", "onnx", "onnx-int8"]),
    help="encoder runtime; auto (default): onnx-int8 for the embedded model on the CPU, else torch",
)


def _settings(config: str | None, **flags) -> Settings:
    cli: dict = {}
    sections = {
        "model": ("encoder", "model"),
        "dim": ("encoder", "embedding_dimension"),
        "batch_size": ("encoder", "batch_size"),
        "prompt_type": ("encoder", "prompt_type"),
        "backend": ("encoder", "backend"),
        "device": ("processing", "device"),
        "data_dir": (None, "data_dir"),
        "collection": (None, "collection"),
        "host": ("server", "host"),
        "port": ("server", "port"),
    }
    for flag, value in flags.items():
        if value is None:
            continue
        section, key = sections[flag]
        if section is None:
            cli[key] = value
        else:
            cli.setdefault(section, {})[key] = value
    settings = load_settings(config, cli=cli)
    context = click.get_current_context(silent=True)
    if context is not None:  # what a failed read or write of the disk is reported against
        context.meta[DATA_DIR_KEY] = settings.data_dir
    return settings


class _Command(click.Group):
    """Usage errors, domain errors, a failed read or write of the disk (a full or read-only data folder), a
    server's error answers and an unreachable server (``--url``) become one clear line on stderr and exit status 2,
    never a traceback."""

    def make_context(self, info_name, args, parent=None, **extra):
        try:
            return super().make_context(info_name, args, parent=parent, **extra)
        except click.exceptions.NoArgsIsHelpError:
            raise
        except click.UsageError as exc:  # an option of the group itself
            _fail(_usage_message(exc))

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except click.exceptions.NoArgsIsHelpError:
            raise
        except click.UsageError as exc:  # a command's arguments and options, or a combination the command refuses
            message = _usage_message(exc)
        except StellaSearchError as exc:
            message = str(exc)
        except (OSError, sqlite3.Error) as exc:
            error = storage_error(exc, ctx.meta.get(DATA_DIR_KEY, Path("data")))
            if error is None:
                raise
            message = str(error)
        except SearchAPIError as exc:
            message = f"the server answered {exc.status_code}: {exc.detail}"
        except httpx.HTTPError as exc:  # --url's server, or a model hub
            where = f" to {exc.request.url}" if _has_request(exc) else ""
            message = f"the HTTP request{where} failed: {type(exc).__name__}: {exc}"
        except httpx.InvalidURL as exc:
            message = f"invalid URL: {exc}"
        _fail(message)


def _fail(message: str) -> None:
    click.echo(f"error: {message}", err=True)
    sys.exit(2)


def _usage_message(exc: click.UsageError) -> str:
    """click's message with the help hint on the same line (click prints usage, hint and error on three)."""
    command = f"{exc.ctx.command_path} --help" if exc.ctx is not None else "stella-search --help"
    return f"{exc.format_message().rstrip('.')} (see '{command}')"


def _has_request(exc: httpx.HTTPError) -> bool:
    try:
        exc.request  # noqa: B018 (raises RuntimeError where httpx has none)
    except RuntimeError:
        return False
    return True


def _common(func):
    options = [
        click.option("--data-dir", type=click.Path(file_okay=False), help="directory holding the collections"),
        click.option("--collection", help="collection name (default: 'default')"),
        click.option("--config", type=click.Path(exists=True, dir_okay=False), help="YAML settings file"),
        click.option("--model", help="stella-1.5b, stella-400m, minilm, or a model folder"),
        click.option("--dim", type=int, help="MRL embedding dimension (default: the model's default head)"),
        click.option("--batch-size", type=int, help="encoder batch size"),
        click.option("--device", help="auto, cpu, cuda, cuda:N"),
        BACKEND_OPTION,
    ]
    for option in reversed(options):
        func = option(func)
    return func


OWN_LOGGERS = ("stella_search", "indexer", "search_api", "storage")
# Libraries whose warnings are about their own internals (the ONNX export's tracer warnings, for one), not the input
LIBRARY_WARNINGS = r"(torch|transformers|sentence_transformers|onnx|onnxruntime)(\.|$)"


def _normal_output(record: logging.LogRecord) -> bool:
    """Without --verbose: our own lines from INFO, other libraries' from WARNING, the root logger's from ERROR
    (onnxruntime's quantiser logs a line per tensor there, and a warning about pre-processing)."""
    if record.name.split(".")[0] in OWN_LOGGERS:
        return True
    return record.levelno >= (logging.ERROR if record.name == "root" else logging.WARNING)


@click.group(cls=_Command)
@click.option("-v", "--verbose", is_flag=True, help="debug logging, and the libraries' own logs, warnings and bars")
def main(verbose: bool) -> None:
    """stella-search: a vector search index for Stella v5 embeddings (FAISS + SQLite)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, handlers=[handler])
    if verbose:
        return
    handler.addFilter(_normal_output)
    warnings.filterwarnings("ignore", module=LIBRARY_WARNINGS)
    # transformers' "Loading weights" bars (read when huggingface_hub is first imported, which is later than this)
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    for noisy in ("sentence_transformers", "transformers", "httpx", "faiss.loader"):
        logging.getLogger(noisy).setLevel(logging.WARNING)  # sentence-transformers shows "Batches" bars below it


@main.command()
@click.argument("paths", nargs=-1, required=True, type=click.Path())
@_common
@click.option("--prompt-type", type=click.Choice(["s2p", "s2s"]), help="fixed when the collection is created")
@click.option(
    "--wait",
    type=float,
    default=0.0,
    show_default=True,
    help="seconds to wait for another writer of the collection before giving up",
)
@click.option(
    "--shards",
    type=click.IntRange(1, 256),
    help="split a new collection into N shards by a hash of document id (fixed at creation)",
)
@click.option("--ray", "ray_address", help="encode on a Ray cluster: 'auto' (the running one) or its ADDRESS")
@click.option("--workers", type=click.IntRange(1), help="with --ray: encoder actors (default: one per GPU, else 2)")
@click.option(
    "--strict", is_flag=True, help="refuse the whole ingest on a record with neither title nor text (default: skip it)"
)
@click.option("--json", "as_json", is_flag=True, help="print the report as JSON")
def ingest(paths, config, wait, shards, ray_address, workers, strict, as_json, **flags):
    """Split, encode and index documents from JSONL (BEIR), CSV, .txt/.md files or folders."""
    settings = _settings(config, **flags)
    if shards is not None:
        check_shards(shards, settings.server)  # the limit a server with these settings applies
    arguments = dict(model=flags["model"], dim=flags["dim"], wait=wait, shards=shards, strict=strict)
    if ray_address:
        from indexer.distributed import ingest_paths_on_ray

        arguments.update(address=ray_address, workers=workers)
        ingest_function = ingest_paths_on_ray
    else:
        from indexer.pipeline import ingest_paths

        if workers is not None:
            raise click.UsageError("--workers needs --ray")
        ingest_function = ingest_paths
    report = ingest_function([Path(p) for p in paths], settings.data_dir, settings.collection, settings, **arguments)
    if as_json:
        click.echo(json.dumps(report.as_dict(), indent=2))
    else:
        click.echo(
            f"{report.documents_seen} documents read: {report.documents_added} added, "
            f"{report.documents_replaced} replaced, {report.documents_unchanged} unchanged, "
            f"{report.metadata_updated} metadata-only; {report.passages_written} passages written "
            f"in {report.seconds:.1f}s; collection now {report.collection['documents']} documents, "
            f"{report.collection['passages']} passages"
        )
        if report.documents_skipped:
            more = report.documents_skipped - len(report.skipped)
            click.echo(
                f"{report.documents_skipped} records skipped (neither title nor text; --strict refuses them): "
                + ", ".join(report.skipped)
                + (f" and {more} more" if more else "")
            )


def _search_options(func):
    options = [
        click.option("--mode", type=click.Choice(["dense", "lexical", "hybrid"]), default="dense", show_default=True),
        click.option(
            "--fusion",
            type=click.Choice(["rrf", "minmax"]),
            default=DEFAULT_FUSION,
            show_default=True,
            help="hybrid: reciprocal rank fusion or min-max normalised scores",
        ),
        click.option(
            "--alpha",
            type=click.FloatRange(0, 1),
            default=DEFAULT_ALPHA,
            show_default=True,
            help="minmax fusion: weight of the dense score",
        ),
        click.option("--filter", "filter_json", help='metadata filter as JSON, e.g. \'{"year": {"$gte": 2020}}\''),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def _filter(filter_json: str | None) -> dict | None:
    if filter_json is None:
        return None
    from storage.errors import InvalidInputError

    try:
        return json.loads(filter_json)
    except ValueError as exc:
        raise InvalidInputError(f"--filter is not JSON: {exc}") from None


@main.command()
@click.argument("query")
@_common
@_search_options
@click.option("-k", "k", type=int, default=10, show_default=True, help="results, 1..server.max_k (1000 by default)")
@click.option("--group-by", type=click.Choice(["passage", "document"]), default="passage", show_default=True)
@click.option("--offset", type=click.IntRange(0, 10_000), default=0, help="results to skip, for paging")
@click.option("--url", help="search through a running server instead of opening the collection")
@click.option("--api-key", envvar=CLIENT_KEY_VARIABLE, help="bearer key for --url")
@click.option("--json", "as_json", is_flag=True)
def search(query, config, mode, fusion, alpha, filter_json, k, group_by, offset, url, api_key, as_json, **flags):
    """Search a collection and print the top passages (or documents)."""
    settings = _settings(config, **flags)
    options = {
        "mode": mode,
        "fusion": fusion,
        "alpha": alpha,
        "filter": _filter(filter_json),
        "group_by": group_by,
        "offset": offset,
    }
    if url:
        from search_api.client import SearchClient

        _refuse_local_options(flags)
        with SearchClient(url, api_key=api_key) as client:
            response = client.search(query, k=k, collection=settings.collection, **options)
        hits = [h.model_dump(exclude={"passages"}) for h in response.results]
        took_ms = response.took_ms
    else:
        from indexer.encoder import configure_search_threads
        from indexer.pipeline import query_encoder_for_collection
        from search_api.retrieval import Retriever, SearchOptions
        from storage.collection import collection_dir
        from storage.sharding import open_collection

        check_query(query, settings.server)  # the limits a server with these settings applies
        check_k(k, settings.server)
        with open_collection(collection_dir(settings.data_dir, settings.collection)) as collection:
            encoder = (
                query_encoder_for_collection(collection, settings, flags["model"], flags["dim"])
                if mode != "lexical"
                else None
            )
            configure_search_threads(settings, getattr(encoder, "device", "cpu"))
            started = time.perf_counter()
            found = Retriever(collection, encoder).search(SearchOptions(query=query, k=k, **options))
            took_ms = (time.perf_counter() - started) * 1000
        hits = [
            {
                "id": r.hit.document_id,
                "passage_id": r.hit.passage_id,
                "score": r.score,
                "title": r.hit.title,
                "text": r.hit.text,
                "metadata": r.hit.metadata,
            }
            for r in found
        ]
    if as_json:
        click.echo(json.dumps({"results": hits, "took_ms": round(took_ms, 2)}, indent=2, ensure_ascii=False))
        return
    if not hits:  # said, not left blank: a filter on a misspelt field matches nothing
        where = f" with filter {json.dumps(options['filter'])}" if options["filter"] is not None else ""
        past = f" past the first {offset}" if offset else ""
        click.echo(f"no results{past} in collection {settings.collection}{where}")
    for rank, hit in enumerate(hits, start=offset + 1):
        title = f" {hit['title']}" if hit["title"] else ""
        snippet = " ".join(hit["text"].split())[:160]
        click.echo(f"{rank:>3}. {hit['score']:.4f} [{hit['id']}]{title}\n     {snippet}")


@main.command(name="eval")
@click.argument("dataset_dir", type=click.Path(exists=True, file_okay=False))
@_common
@_search_options
@click.option("-k", "k", type=click.IntRange(10, 1000), default=100, show_default=True, help="documents per query")
@click.option("--url", help="search through a running server (the collection must already be ingested)")
@click.option("--api-key", envvar=CLIENT_KEY_VARIABLE, help="bearer key for --url")
@click.option("--json", "as_json", is_flag=True)
def evaluate_command(dataset_dir, config, mode, fusion, alpha, filter_json, k, url, api_key, as_json, **flags):
    """nDCG@10, recall@100 and MRR@10 on a BEIR dataset (ingesting its corpus first if needed).

    Documents are ranked by their best passage (group_by document), in the chosen --mode.
    """
    from indexer.evaluation import BeirDataset, evaluate, run_queries

    dataset = BeirDataset.load(Path(dataset_dir))
    if flags["collection"] is None:
        flags["collection"] = f"{dataset.name}-{_slug(flags['model'] or 'default')}"
    settings = _settings(config, **flags)
    options = {"mode": mode, "fusion": fusion, "alpha": alpha, "filter": _filter(filter_json), "group_by": "document"}
    started = time.perf_counter()
    if url:
        from search_api.client import SearchClient

        _refuse_local_options(flags)
        with SearchClient(url, api_key=api_key) as client:

            def search_fn(queries, k):
                responses = client.search_batch(queries, k=k, collection=settings.collection, **options)
                return [[(h.id, h.score) for h in r.results] for r in responses]

            # batches whose responses stay within the limit a server with these settings applies
            batch = max(1, min(64, settings.server.max_response_hits // k))
            run = run_queries(dataset, search_fn, k, batch=batch)
    else:
        from indexer.encoder import configure_search_threads
        from indexer.pipeline import ingest_documents, open_or_create_collection
        from indexer.sources import check_sources, read_documents
        from search_api.retrieval import Retriever, SearchOptions

        check_k(k, settings.server)
        configure_search_threads(settings)
        collection, encoder = open_or_create_collection(
            settings.data_dir, settings.collection, settings, flags["model"], flags["dim"]
        )
        with collection:
            if collection.count_documents() == 0:
                log.info("collection %s is empty: ingesting %s", collection.name, dataset.corpus)
                limits = settings.ingest.metadata_limits()
                sources = check_sources([dataset.corpus], limits=limits)
                if sources.skipped:
                    log.info("%d records with neither title nor text skipped", sources.skipped)
                with collection.writing():
                    documents = read_documents(dataset.corpus, limits)
                    ingest_documents(collection, encoder, documents, settings, total=sources.documents)
            retriever = Retriever(collection, encoder)

            def search_fn(queries, k):
                for query in queries:
                    check_query(query, settings.server)
                found = retriever.search_many([SearchOptions(query=q, k=k, **options) for q in queries])
                return [[(r.hit.document_id, r.score) for r in results] for results in found]

            run = run_queries(dataset, search_fn, k)
    scores = evaluate(dataset, run)
    scores.update(collection=settings.collection, mode=mode, seconds=round(time.perf_counter() - started, 2))
    if mode == "hybrid":
        scores.update(fusion=fusion, alpha=alpha)
    if as_json:
        click.echo(json.dumps(scores, indent=2))
    else:
        label = mode if mode != "hybrid" else f"hybrid/{fusion}" + (f" alpha {alpha}" if fusion == "minmax" else "")
        click.echo(
            f"{dataset.name} ({scores['queries']} queries, collection {settings.collection}, {label}): "
            f"nDCG@10 {scores['ndcg@10']:.4f}  recall@100 {scores['recall@100']:.4f}  MRR@10 {scores['mrr@10']:.4f}"
        )


def _refuse_local_options(flags: dict) -> None:
    """With --url the server encodes with each collection's own model: options that only apply locally are refused,
    not silently ignored."""
    given = [
        f"--{name.replace('_', '-')}" for name in ("model", "dim", "batch_size", "device", "backend") if flags[name]
    ]
    if given:
        raise click.UsageError(f"{', '.join(given)} apply to a local collection; with --url the server uses its own")


def _slug(model: str) -> str:
    name = Path(model).name if os.sep in model else model
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in name)[:40]


@main.command()
@click.option("--data-dir", type=click.Path(file_okay=False))
@click.option("--collection", help="collection name (default: 'default')")
@click.option("--config", type=click.Path(exists=True, dir_okay=False))
@click.option("--id", "ids", multiple=True, help="a document id to delete (repeatable)")
@click.option("--filter", "filter_json", help='metadata filter as JSON, e.g. \'{"year": {"$lt": 2000}}\'')
@click.option("--wait", type=float, default=0.0, show_default=True, help="seconds to wait for another writer")
def delete(data_dir, collection, config, ids, filter_json, wait):
    """Delete documents by id and/or metadata filter, in one transaction (per shard)."""
    from storage.collection import collection_dir
    from storage.errors import InvalidInputError
    from storage.inputs import lone_surrogate
    from storage.sharding import open_collection

    settings = _settings(config, data_dir=data_dir, collection=collection)
    where = _filter(filter_json or None)
    if problem := lone_surrogate(list(ids), "--id"):  # bytes that are not UTF-8 on the command line
        raise InvalidInputError(f"{problem}; give ids as UTF-8")
    if not ids and where is None:
        raise InvalidInputError("name the documents to delete with --id and/or --filter")
    with open_collection(collection_dir(settings.data_dir, settings.collection)) as opened:
        with opened.writing(wait):
            deleted = opened.delete(list(ids), where=where)
        opened.checkpoint()
    click.echo(f"deleted {deleted} documents from {settings.collection}")


@main.command()
@click.option("--data-dir", type=click.Path(file_okay=False))
@click.option("--collection", help="collection name (default: 'default'; with --prune: every collection)")
@click.option("--config", type=click.Path(exists=True, dir_okay=False))
@click.option("--out", type=click.Path(file_okay=False), help="snapshot directory (default: under snapshot_dir)")
@click.option("--wait", type=float, default=60.0, show_default=True, help="seconds to wait for another writer")
@click.option(
    "--prune", is_flag=True, help="take none: delete those in snapshot_dir beyond snapshot_keep per collection"
)
def snapshot(data_dir, collection, config, out, wait, prune):
    """Copy a collection consistently (SQLite backup API + index checkpoint), also while it is being served.

    A snapshot into snapshot_dir (the default) is followed by the retention: each collection keeps its newest
    ``snapshot_keep`` snapshots there (0 keeps all). A sharded collection is snapshotted shard by shard: each shard is
    an ordinary collection (``--data-dir DATA/NAME --collection shard-000``).
    """
    from indexer.settings import snapshot_dir
    from storage.collection import Collection, collection_dir
    from storage.disk import folder_bytes, require_room
    from storage.sharding import refuse_sharded
    from storage.snapshots import prune_snapshots, snapshot_name, take_snapshot

    settings = _settings(config, data_dir=data_dir, collection=collection)
    root = snapshot_dir(settings)
    if prune:
        if out:
            raise click.UsageError("--prune applies to snapshot_dir; it takes no --out")
        pruned = prune_snapshots(root, settings.snapshot_keep, collection=collection)
        click.echo(json.dumps({"snapshot_dir": str(root), "keep": settings.snapshot_keep, "deleted": pruned}, indent=2))
        return
    refuse_sharded(collection_dir(settings.data_dir, settings.collection), "snapshot")
    destination = Path(out) if out else root / snapshot_name(settings.collection)
    with Collection.open(collection_dir(settings.data_dir, settings.collection)) as opened:
        needed = folder_bytes(opened.path)
        require_room(destination, needed, "the snapshot", settings.data_dir, settings.storage.reserve_bytes)
        info = take_snapshot(opened, destination, wait=wait)
    pruned = []
    if destination.parent.resolve() == root.resolve():  # the retention governs snapshot_dir, not copies elsewhere
        pruned = prune_snapshots(root, settings.snapshot_keep, collection=settings.collection)
    click.echo(json.dumps({"snapshot": str(destination), **info, "pruned": pruned}, indent=2))


@main.command()
@click.argument("snapshot_path", type=click.Path(exists=True, file_okay=False))
@click.option("--data-dir", type=click.Path(file_okay=False))
@click.option("--collection", help="collection name to restore as (default: 'default')")
@click.option("--config", type=click.Path(exists=True, dir_okay=False))
@click.option("--replace", is_flag=True, help="replace an existing collection (kept aside, never deleted)")
def restore(snapshot_path, data_dir, collection, config, replace):
    """Verify a snapshot (checksums, schema, SQLite integrity, vectors, index, counts) and install it as a collection.

    The copy is verified before anything moves; an existing collection is kept aside, never deleted, with --replace.
    """
    from storage.collection import collection_dir
    from storage.disk import folder_bytes, require_room
    from storage.snapshots import restore_snapshot

    settings = _settings(config, data_dir=data_dir, collection=collection)
    target = collection_dir(settings.data_dir, settings.collection)
    needed = folder_bytes(snapshot_path)
    require_room(target, needed, "the restored collection", settings.data_dir, settings.storage.reserve_bytes)
    info = restore_snapshot(Path(snapshot_path), target, replace=replace)
    click.echo(f"restored {snapshot_path} as {target}: {info['documents']} documents, {info['passages']} passages")


@main.command(name="reshard")
@click.option("--data-dir", type=click.Path(file_okay=False))
@click.option("--collection", help="the collection to copy (default: 'default')")
@click.option("--config", type=click.Path(exists=True, dir_okay=False))
@click.option("--shards", type=click.IntRange(1, 256), required=True, help="shards of the new collection")
@click.option("--to", "target", required=True, help="name of the new collection")
def reshard_command(data_dir, collection, config, shards, target):
    """Copy a collection into a new one with --shards shards, from its stored vectors (nothing is re-encoded).

    Serve the new one (or swap the directories while nothing serves them) to change a collection's shard count.
    """
    from storage.collection import collection_dir
    from storage.sharding import open_collection, reshard

    settings = _settings(config, data_dir=data_dir, collection=collection)
    check_shards(shards, settings.server)
    with open_collection(collection_dir(settings.data_dir, settings.collection)) as source:
        with reshard(source, collection_dir(settings.data_dir, target), shards) as copy:
            click.echo(
                f"copied {settings.collection} into {target}: {shards} shard(s), {copy.count_documents()} documents, "
                f"{copy.count_passages()} passages"
            )


@main.command(name="index-field")
@click.argument("field")
@click.option("--data-dir", type=click.Path(file_okay=False))
@click.option("--collection", help="collection name (default: 'default')")
@click.option("--config", type=click.Path(exists=True, dir_okay=False))
@click.option("--wait", type=float, default=0.0, show_default=True, help="seconds to wait for another writer")
def index_field(field, data_dir, collection, config, wait):
    """Index a metadata FIELD so filters on it ($eq, $in, ranges) use an index instead of scanning."""
    from storage.collection import collection_dir
    from storage.sharding import open_collection

    settings = _settings(config, data_dir=data_dir, collection=collection)
    with open_collection(collection_dir(settings.data_dir, settings.collection)) as opened:
        with opened.writing(wait):
            rows = opened.index_field(field)
        fields = sorted(opened.indexed_fields())
    click.echo(f"indexed {field!r} in {settings.collection} ({rows} values); indexed fields: {', '.join(fields)}")


@main.command()
@click.option("--data-dir", type=click.Path(file_okay=False))
@click.option("--collection", help="collection name (default: 'default')")
@click.option("--config", type=click.Path(exists=True, dir_okay=False))
@click.option(
    "--index",
    "index_type",
    help="auto, Flat, HNSW32, or an IVF factory string (IVF,SQ8  IVF4096,SQ8  IVF,Flat  IVF,PQ48); "
    "default: the collection's last choice, else auto",
)
@click.option(
    "--recall",
    type=click.FloatRange(0, 1, min_open=True),
    help="recall@10 against exact search that nprobe / efSearch are tuned to, on held-out stored vectors "
    "(default 0.95); an exact index reports that it does not apply",
)
@click.option(
    "--queries",
    "queries_file",
    type=click.Path(exists=True, dir_okay=False),
    help="tune on these real queries (BEIR queries.jsonl, or one per line) instead of held-out passages",
)
@click.option("--wait", type=float, default=60.0, show_default=True, help="seconds to wait for another writer")
def optimize(data_dir, collection, config, index_type, recall, queries_file, wait):
    """Rebuild a collection's vector index from SQLite (auto: Flat when small, IVF-SQ8 when large) and tune it.

    A sharded collection is optimized shard by shard, each for its own size.
    """
    from storage.collection import collection_dir
    from storage.disk import index_bytes_at_most, require_room
    from storage.sharding import open_collection

    settings = _settings(config, data_dir=data_dir, collection=collection)
    with open_collection(collection_dir(settings.data_dir, settings.collection)) as opened:
        needed = index_bytes_at_most(opened.count_passages(), opened.dim)
        require_room(opened.path, needed, "the new index", settings.data_dir, settings.storage.reserve_bytes)
        queries = None
        if queries_file:
            from indexer.pipeline import encoder_for_collection

            queries = encoder_for_collection(opened, settings).encode_queries(_query_texts(Path(queries_file)))
        report = opened.optimize(index_type, recall=recall, wait=wait, queries=queries)
    click.echo(json.dumps(report, indent=2))


def _query_texts(path: Path) -> list[str]:
    """Query texts of a BEIR ``queries.jsonl`` (its ``text`` fields) or of a plain file (its non-empty lines)."""
    from storage.errors import InvalidInputError

    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidInputError(f"{path} is not UTF-8 text ({exc}): save the queries as UTF-8") from None
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if path.suffix == ".jsonl":
        try:
            lines = [json.loads(line)["text"] for line in lines]
        except (ValueError, KeyError, TypeError) as exc:
            raise InvalidInputError(f"{path}: expected one JSON object with a 'text' field per line ({exc})") from None
    if not lines:
        raise InvalidInputError(f"{path} holds no queries")
    return lines


@main.command()
@click.option("--data-dir", type=click.Path(file_okay=False))
@click.option("--collection", help="one collection (default: all under --data-dir)")
@click.option("--config", type=click.Path(exists=True, dir_okay=False))
def info(data_dir, collection, config):
    """Print the manifest and counts of the collections (and of each shard of a sharded one)."""
    from storage.collection import collection_dir, list_collections
    from storage.sharding import open_collection

    settings = _settings(config, data_dir=data_dir)
    names = [collection] if collection else list_collections(settings.data_dir)
    out = []
    for name in names:
        with open_collection(collection_dir(settings.data_dir, name)) as opened:
            out.append(opened.info())
    click.echo(json.dumps(out, indent=2))


@main.command()
@click.option("--data-dir", type=click.Path(file_okay=False))
@click.option("--config", type=click.Path(exists=True, dir_okay=False))
@click.option("--host", help="bind address (default 127.0.0.1)")
@click.option("--port", type=int, help="port (default 8000)")
@click.option("--model", help="model to load when the data dir has no collection yet")
@click.option("--device", help="auto, cpu, cuda, cuda:N")
@BACKEND_OPTION
@click.option("--ray", "ray_address", help="serve on Ray Serve: 'auto' (the running cluster) or its ADDRESS")
@click.option("--shard-replicas", type=click.IntRange(1), help="with --ray: replicas per shard (default 1)")
@click.option("--encoder-replicas", type=click.IntRange(1), help="with --ray: encoder replicas (default 1)")
def serve(data_dir, config, host, port, model, device, backend, ray_address, shard_replicas, encoder_replicas):
    """Serve the collections under --data-dir over HTTP (FastAPI under uvicorn, or on Ray Serve with --ray)."""
    settings = _settings(config, data_dir=data_dir, host=host, port=port, model=model, device=device, backend=backend)
    if ray_address:
        from search_api.cluster import serve_on_ray

        click.echo(f"deploying {settings.data_dir} on Ray Serve ({ray_address})", err=True)
        serve_on_ray(settings, ray_address, shard_replicas or 1, encoder_replicas or 1)
        return
    if shard_replicas or encoder_replicas:
        raise click.UsageError("--shard-replicas and --encoder-replicas need --ray")
    import uvicorn

    from search_api.app import create_app
    from search_api.timeouts import uvicorn_options

    app = create_app(settings)
    click.echo(
        f"serving {settings.data_dir} on http://{settings.server.host}:{settings.server.port} (docs at /docs)",
        err=True,
    )
    uvicorn.run(
        app, host=settings.server.host, port=settings.server.port, log_level="info", **uvicorn_options(settings.server)
    )


if __name__ == "__main__":
    main()
