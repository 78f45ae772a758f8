using System.CommandLine;
using System.Diagnostics;
using System.Text;
using System.Text.Json;
using AnyPrecML.MLNet;
using Microsoft.ML;

namespace AnyPrecML.Cli;

/// <summary>
/// `anyprec score`: a batch job streaming a file of texts through the ML.NET transformer at one width, writing one
/// JSON line per row. Resumable: rows already in the output are skipped, so a crashed job is simply run again.
/// </summary>
internal static class ScoreCommand
{
    public static Command Create()
    {
        var model = new Option<string>("--model", "-m") { Description = "An any-precision model directory.", Required = true };
        var input = new Option<string>("--input", "-i") { Description = "Rows to score: .csv or .tsv (with a header) or .jsonl.", Required = true };
        var column = new Option<string>("--column", "-c") { Description = "The text column (CSV/TSV header name or JSON property).", DefaultValueFactory = _ => "text" };
        var bits = CommonOptions.Bits();
        var output = new Option<string>("--output", "-o") { Description = "JSON lines written: {row, token_count, log_likelihood, perplexity, completion}.", Required = true };
        var completion = new Option<int>("--completion-tokens") { Description = "Tokens to generate per row (0: score only).", DefaultValueFactory = _ => 0 };
        var engine = CommonOptions.Engine();
        var json = CommonOptions.Json();
        var command = new Command("score", "Score (and optionally complete) every row of a file at one width; resumable.")
        {
            model, input, column, bits, output, completion, engine, json,
        };
        command.SetAction((r, ct) =>
        {
            string inPath = r.GetValue(input)!, outPath = r.GetValue(output)!, col = r.GetValue(column)!;
            if (!File.Exists(inPath)) throw new FileNotFoundException($"no input file at '{inPath}'.", inPath);
            int done = CompleteLines(outPath);
            var ml = new MLContext(seed: 0);
            var options = new AnyPrecisionQuantizeOptions
            {
                ModelPath = r.GetValue(model)!, InputColumnName = "Text", Bits = r.GetValue(bits), CompletionTokens = r.GetValue(completion),
                Engine = r.GetValue(engine) == "reference" ? AnyPrecisionEngineKind.Reference : AnyPrecisionEngineKind.Onnx,
            };
            if (!Directory.Exists(options.ModelPath) || !Models.LlamaCheckpoint.IsAnyPrecision(options.ModelPath))
                throw new ArgumentException($"'{options.ModelPath}' is not an any-precision model directory (make one with `anyprec quantize`).");
            using var transformer = ml.Transforms.AnyPrecisionQuantize(options).Fit(ml.Data.LoadFromEnumerable(Array.Empty<Row>()));

            // Rows stream from the file into the lazy transform and out to the file; nothing holds them all.
            var rows = ReadTexts(inPath, col).Skip(done).Select(t => new Row { Text = t });
            var view = transformer.Transform(ml.Data.LoadFromEnumerable(rows));
            var err = r.Err();
            var sw = Stopwatch.StartNew();
            int written = 0;
            using (var writer = new StreamWriter(new FileStream(outPath, FileMode.Append, FileAccess.Write, FileShare.Read), new UTF8Encoding(false)))
            using (var cursor = view.GetRowCursor(view.Schema))
            {
                var ll = cursor.GetGetter<float>(view.Schema["LogLikelihood"]);
                var n = cursor.GetGetter<int>(view.Schema["TokenCount"]);
                var ppl = cursor.GetGetter<float>(view.Schema["Perplexity"]);
                var comp = cursor.GetGetter<ReadOnlyMemory<char>>(view.Schema["Completion"]);
                float llv = 0, pplv = 0; int nv = 0; ReadOnlyMemory<char> cv = default;
                while (cursor.MoveNext())
                {
                    ct.ThrowIfCancellationRequested();
                    ll(ref llv); n(ref nv); ppl(ref pplv); comp(ref cv);
                    writer.WriteLine(JsonSerializer.Serialize(new
                    {
                        row = done + written, token_count = nv, log_likelihood = Number(llv), perplexity = Number(pplv), completion = cv.ToString(),
                    }));
                    writer.Flush(); // a crash loses at most the row being written; the next run truncates and redoes it
                    written++;
                    if (written % 100 == 0) err.WriteLine($"score: {done + written} rows ({written / sw.Elapsed.TotalSeconds:F1} rows/s)");
                }
            }
            double seconds = sw.Elapsed.TotalSeconds;
            var summary = new { output = Path.GetFullPath(outPath), rows = written, skipped = done, bits = transformer.Bits, seconds = Math.Round(seconds, 2), rows_per_second = Math.Round(written / Math.Max(seconds, 1e-9), 2) };
            if (r.GetValue(json)) r.WriteJson(summary);
            else r.Out().WriteLine($"scored {written} rows at {transformer.Bits} bits in {seconds:F1} s ({summary.rows_per_second} rows/s){(done > 0 ? $", after {done} already written" : "")} → {summary.output}");
            return Task.FromResult(0);
        });
        return command;
    }

    private sealed class Row
    {
        public string Text { get; set; } = "";
    }

    private static double? Number(float v) => float.IsFinite(v) ? Math.Round(v, 5) : null;

    /// <summary>Rows already written: complete lines; a torn last line (a crash mid-write) is cut off.</summary>
    private static int CompleteLines(string path)
    {
        if (!File.Exists(path)) return 0;
        using var fs = new FileStream(path, FileMode.Open, FileAccess.ReadWrite);
        int lines = 0;
        long lastNewline = -1, pos = 0;
        var buffer = new byte[1 << 16];
        int read;
        while ((read = fs.Read(buffer)) > 0)
        {
            for (int i = 0; i < read; i++)
                if (buffer[i] == (byte)'\n') { lines++; lastNewline = pos + i; }
            pos += read;
        }
        if (lastNewline + 1 != fs.Length) fs.SetLength(lastNewline + 1);
        return lines;
    }

    /// <summary>The text column of a .jsonl, .csv or .tsv file, row by row.</summary>
    internal static IEnumerable<string> ReadTexts(string path, string column)
    {
        string ext = Path.GetExtension(path).ToLowerInvariant();
        if (ext == ".jsonl")
        {
            int line = 0;
            foreach (var l in File.ReadLines(path))
            {
                line++;
                if (string.IsNullOrWhiteSpace(l)) continue;
                using var doc = JsonDocument.Parse(l);
                if (!doc.RootElement.TryGetProperty(column, out var v))
                    throw new FormatException($"{path}:{line}: no property '{column}'.");
                yield return v.ValueKind == JsonValueKind.Null ? "" : v.GetString() ?? "";
            }
            yield break;
        }
        char sep = ext switch
        {
            ".csv" => ',',
            ".tsv" => '\t',
            _ => throw new ArgumentException($"'{path}': input must be .csv, .tsv or .jsonl."),
        };
        using var reader = new StreamReader(path);
        var header = ReadRecord(reader, sep) ?? throw new FormatException($"{path} is empty: a header row naming '{column}' is expected.");
        int index = header.IndexOf(column);
        if (index < 0) throw new FormatException($"{path}: no column '{column}' in the header ({string.Join(", ", header)}).");
        while (ReadRecord(reader, sep) is { } record)
            yield return index < record.Count ? record[index] : "";
    }

    /// <summary>One record with RFC 4180 quoting (quoted fields may hold separators, quotes and newlines).</summary>
    private static List<string>? ReadRecord(TextReader reader, char sep)
    {
        int c = reader.Peek();
        if (c < 0) return null;
        var fields = new List<string>();
        var field = new StringBuilder();
        bool quoted = false;
        while ((c = reader.Read()) >= 0)
        {
            char ch = (char)c;
            if (quoted)
            {
                if (ch == '"')
                {
                    if (reader.Peek() == '"') { field.Append('"'); reader.Read(); }
                    else quoted = false;
                }
                else field.Append(ch);
            }
            else if (ch == '"') quoted = true;
            else if (ch == sep) { fields.Add(field.ToString()); field.Clear(); }
            else if (ch == '\n') break;
            else if (ch != '\r') field.Append(ch);
        }
        fields.Add(field.ToString());
        return fields;
    }
}
