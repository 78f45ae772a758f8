using System.CommandLine;
using System.Diagnostics;
using System.Text;
using System.Text.Json;
using AnyPrecML.MLNet;
using AnyPrecML.MLNet.Scoring;
using Microsoft.ML;

namespace AnyPrecML.Cli;

/// <summary>
/// `anyprec score`: a batch job streaming a file of texts through the ML.NET transformer at one width, writing one
/// JSON line per row. The output is locked while a run writes it; a manifest beside it records what produced it and
/// how far a durable (fsync'd) checkpoint got, so <c>--resume</c> continues only the same job and redoes only the rows
/// after the last checkpoint. Invalid rows go to an errors file with their line numbers; the run continues.
/// </summary>
internal static class ScoreCommand
{
    public static Command Create()
    {
        var model = new Option<string>("--model", "-m") { Description = "An any-precision model directory.", Required = true };
        var input = new Option<string>("--input", "-i") { Description = "Rows to score: .csv or .tsv (with a header) or .jsonl.", Required = true };
        var column = new Option<string>("--column", "-c") { Description = "The text column (CSV/TSV header name or JSON property).", DefaultValueFactory = _ => "text" };
        var bits = CommonOptions.Width();
        var profile = CommonOptions.Profile();
        var budgetColumn = new Option<string?>("--budget-column") { Description = "A column of per-row latency budgets (ms per generated token; empty: none): such a row runs at the widest width, or draft/target pair, whose cost measured on this machine meets it; its line says which and why." };
        var overBudget = new Option<string>("--over-budget") { Description = "A row whose budget no width meets: error (stop the run, naming the row) or fastest (run the fastest route; its line carries a warning).", DefaultValueFactory = _ => "error" };
        overBudget.AcceptOnlyFromAmong("error", "fastest");
        var output = new Option<string>("--output", "-o") { Description = "JSON lines written: {row, token_count, log_likelihood, perplexity, completion}.", Required = true };
        var completion = new Option<int>("--completion-tokens") { Description = "Tokens to generate per row (0: score only).", DefaultValueFactory = _ => 0 };
        var engine = CommonOptions.Engine();
        var resume = new Option<bool>("--resume") { Description = "Continue the job that wrote --output (same model, width, input and options; checked against its manifest)." };
        var errors = new Option<string?>("--errors") { Description = "Invalid rows, one JSON line each with its input line number (default: <output>.errors.jsonl)." };
        var checkpointRows = new Option<int>("--checkpoint-rows") { Description = "Rows between durable checkpoints (fsync of output, errors and manifest).", DefaultValueFactory = _ => 100 };
        var maxRowChars = new Option<int>("--max-row-chars") { Description = "Longest text scored per row, in characters; longer ones follow --long-rows.", DefaultValueFactory = _ => 100_000 };
        var longRows = new Option<string>("--long-rows") { Description = "A row over --max-row-chars: truncate (score its first characters, with a warning) or reject (into the errors file).", DefaultValueFactory = _ => "truncate" };
        longRows.AcceptOnlyFromAmong("truncate", "reject");
        var maxRowBytes = new Option<int>("--max-row-bytes") { Description = "Largest raw input record read into memory, in bytes; larger records are rejected without being held.", DefaultValueFactory = _ => 64 << 20 };
        var json = CommonOptions.Json();
        var command = new Command("score", "Score (and optionally complete) every row of a file at one width; locked, checkpointed, resumable.")
        {
            model, input, column, bits, profile, budgetColumn, overBudget, output, completion, engine, resume, errors, checkpointRows, maxRowChars, longRows, maxRowBytes, json,
        };
        command.SetAction((r, ct) =>
        {
            string inPath = r.GetValue(input)!, outPath = Path.GetFullPath(r.GetValue(output)!), col = r.GetValue(column)!;
            string errPath = Path.GetFullPath(r.GetValue(errors) ?? outPath + ".errors.jsonl");
            var limits = new RowLimits(r.GetValue(maxRowChars), r.GetValue(longRows) == "reject", r.GetValue(maxRowBytes));
            int every = r.GetValue(checkpointRows);
            if (every < 1) throw new ArgumentException($"--checkpoint-rows {every} must be at least 1.");
            if (limits.MaxChars < 1 || limits.MaxBytes < 1) throw new ArgumentException("--max-row-chars and --max-row-bytes must be at least 1.");
            if (!File.Exists(inPath)) throw new FileNotFoundException($"{inPath}: no input file there.", inPath);
            string? budgetCol = r.GetValue(budgetColumn);
            ScoreInput.Check(inPath, col, budgetCol);
            string modelPath = r.GetValue(model)!;
            if (!Directory.Exists(modelPath) || !Models.LlamaCheckpoint.IsAnyPrecision(modelPath))
                throw new ArgumentException($"'{modelPath}' is not an any-precision model directory (make one with `anyprec quantize`).");

            // The lock comes first: a second writer is refused before it reads or changes anything.
            using var job = ScoreJob.Lock(outPath, errPath);
            var ml = new MLContext(seed: 0);
            var engineKind = r.GetValue(engine) == "reference" ? AnyPrecisionEngineKind.Reference : AnyPrecisionEngineKind.Onnx;
            int completionTokens = r.GetValue(completion);
            string? profilePath = CommonOptions.ProfilePath(modelPath, r.GetValue(bits), r.GetValue(profile));
            using var transformer = RowScorer.Open(ml, modelPath, profilePath is null && r.GetValue(bits) is double whole ? checked((int)whole) : null, completionTokens, engineKind,
                profilePath, budgets: budgetCol is not null, fastestWhenOverBudget: r.GetValue(overBudget) == "fastest");
            // The GPU build falls back to the CPU when CUDA cannot start: say so, as generate does.
            if (transformer.DeviceFallback is { } why) r.Err().WriteLine($"warning: {why}");
            var identity = new ScoreManifest.JobIdentity(
                Quantization.AnyPrecisionModel.ContentHash(modelPath), transformer.Bits, Path.GetFullPath(inPath), ScoreInput.Sha256(inPath),
                col, completionTokens, engineKind.ToString().ToLowerInvariant(), limits.MaxChars, limits.Reject ? "reject" : "truncate", limits.MaxBytes,
                $"profile [{string.Join(",", transformer.Profile?.Widths ?? [])}], budget column {budgetCol ?? "none"}, over budget {r.GetValue(overBudget)}");
            long done = job.Start(identity, r.GetValue(resume));

            // Rows stream from the file into the lazy transform and out to the files; nothing holds them all.
            var err = r.Err();
            // A first pass counts the rows (cheap beside running the model on each) so the progress has a total and an ETA.
            long total = ScoreInput.Read(inPath, col, limits).LongCount();
            var progress = new ConsoleProgress<long>(err, "score", n => (n, total - done), "rows");
            var sw = Stopwatch.StartNew();
            long written = 0, rejected = 0, consumed = done;
            foreach (var row in RowScorer.Score(ml, transformer, ScoreInput.Read(inPath, col, limits, budgetCol).Skip(checked((int)done))))
            {
                ct.ThrowIfCancellationRequested();
                if (row.ErrorLine is not null)
                {
                    job.WriteError(row.ErrorLine);
                    progress.Line($"warning: row {row.Index} rejected: {row.Problem} ({inPath}:{row.Line})");
                    rejected++;
                }
                else
                {
                    if (row.Truncated) progress.Line($"warning: row {row.Index} is longer than --max-row-chars {limits.MaxChars}; its first {limits.MaxChars} characters are scored ({inPath}:{row.Line})");
                    if (row.RouteWarning is not null) progress.Line($"{row.RouteWarning} (row {row.Index}, {inPath}:{row.Line})");
                    job.WriteOutput(row.OutputLine!);
                    written++;
                }
                consumed++;
                if ((consumed - done) % every == 0) job.Checkpoint(consumed, complete: false);
                progress.Report(consumed - done);
            }
            job.Checkpoint(consumed, complete: true);
            double seconds = sw.Elapsed.TotalSeconds;
            var summary = new
            {
                output = outPath, rows = written, rejected, errors = errPath, skipped = done, bits = transformer.Profile is { } p ? Math.Round(p.AverageBits, 4) : transformer.Bits, seconds = Math.Round(seconds, 2),
                rows_per_second = Math.Round((consumed - done) / Math.Max(seconds, 1e-9), 2), peak_resident_bytes = PeakResidentBytes(),
            };
            if (r.GetValue(json)) r.WriteJson(summary);
            else r.Out().WriteLine($"scored {written} rows at {summary.bits} bits{(budgetCol is null ? "" : " (rows with a budget: as routed)")} in {seconds:F1} s ({summary.rows_per_second} rows/s){(done > 0 ? $", after {done} already done" : "")}{(rejected > 0 ? $"; {rejected} rejected into {errPath}" : "")} → {outPath}");
            return Task.FromResult(0);
        });
        return command;
    }

    /// <summary>The kernel's high-water mark of this process's resident memory (VmHWM), or null where there is no /proc.</summary>
    internal static long? PeakResidentBytes()
    {
        try
        {
            foreach (var l in File.ReadLines("/proc/self/status"))
                if (l.StartsWith("VmHWM:", StringComparison.Ordinal))
                    return long.Parse(l.AsSpan(6).Trim().TrimEnd("kB").Trim(), System.Globalization.CultureInfo.InvariantCulture) * 1024;
        }
        catch (IOException) { }
        catch (UnauthorizedAccessException) { }
        return null;
    }
}
