using System.Buffers;
using System.Text;
using System.Text.Json;

namespace AnyPrecML.MLNet.Scoring;

/// <summary>How long a row may be: texts over <see cref="MaxChars"/> are truncated or rejected; raw records over <see cref="MaxBytes"/> are rejected unread.</summary>
internal sealed record RowLimits(int MaxChars, bool Reject, int MaxBytes);

/// <summary>One input record: its text, or the problem that makes it invalid, with its place in the file.</summary>
/// <remarks><see cref="Budget"/>: the row's latency budget in ms per token when a budget column is read and the row has one.</remarks>
internal readonly record struct InputRecord(long Index, long Line, string? Text, string? Problem, bool Truncated, double? Budget = null);

/// <summary>
/// `score`'s input readers (.jsonl, .csv, .tsv), streaming record by record. Memory is bounded per record: a record is
/// read into memory only up to <see cref="RowLimits.MaxBytes"/> (a larger one is skipped to its end and reported), and
/// a text longer than <see cref="RowLimits.MaxChars"/> is cut (or rejected) before it reaches the tokenizer.
/// A malformed record becomes an <see cref="InputRecord"/> with a problem; only a malformed file (no header, no such
/// column) stops the run.
/// </summary>
internal static class ScoreInput
{
    /// <summary>Checks the extension and, for CSV/TSV, that the header names <paramref name="column"/>.</summary>
    public static void Check(string path, string column, string? budgetColumn = null)
    {
        if (Separator(path) is not char sep) return;
        using var reader = new StreamReader(path);
        long line = 1;
        var header = ReadRecord(reader, sep, MaxHeaderChars, ref line);
        ColumnOf(path, column, header);
        if (budgetColumn is not null) ColumnOf(path, budgetColumn, header);
    }

    /// <summary>A header longer than this is not a header (a CSV without one, or a damaged file): it is not read into memory whole.</summary>
    private const int MaxHeaderChars = 1 << 20;

    /// <summary>The index of <paramref name="column"/> in the header; a missing, over-long or column-less header stops the run.</summary>
    private static int ColumnOf(string path, string column, Record? header)
    {
        if (header is not { } h) throw new FormatException($"{path}: the file is empty; a header row naming '{column}' is expected.");
        if (h.Fields is null) throw new FormatException($"{path}:1: the header is over {MaxHeaderChars} characters; a header row naming '{column}' is expected.");
        int col = h.Fields.IndexOf(column);
        if (col >= 0) return col;
        // The fields are shown as they are only when short and printable (found by fuzzing: a quoted field with a line break split the error).
        var shown = h.Fields.Take(10).Select(f => f.Length > 40 || f.Any(char.IsControl) ? JsonSerializer.Serialize(f.Length > 40 ? f[..40] + "…" : f) : f);
        throw new FormatException($"{path}:1: no column '{column}' in the header ({string.Join(", ", shown)}{(h.Fields.Count > 10 ? $", … {h.Fields.Count} fields" : "")}).");
    }

    /// <summary>The records of <paramref name="path"/>, in order, with each row's budget from <paramref name="budgetColumn"/> when given; blank JSONL lines are not records.</summary>
    public static IEnumerable<InputRecord> Read(string path, string column, RowLimits limits, string? budgetColumn = null) =>
        Separator(path) is char sep ? ReadDelimited(path, column, sep, limits, budgetColumn) : ReadJsonLines(path, column, limits, budgetColumn);

    /// <summary>
    /// A record with its budget: an empty or absent value is no budget; anything but a positive number makes the row
    /// invalid (it goes to the errors file), never a silent default.
    /// </summary>
    private static InputRecord WithBudget(InputRecord record, string? budgetColumn, string? raw, bool present)
    {
        if (budgetColumn is null || record.Problem is not null || !present || string.IsNullOrWhiteSpace(raw)) return record;
        return double.TryParse(raw, System.Globalization.NumberStyles.Float, System.Globalization.CultureInfo.InvariantCulture, out double ms) && ms > 0 && double.IsFinite(ms)
            ? record with { Budget = ms }
            : record with { Text = null, Problem = $"budget column '{budgetColumn}' holds '{raw}', not a positive number of milliseconds", Truncated = false };
    }

    /// <summary>SHA-256 of the input file, read in a stream (hex): a job's input is recognised by content, not path.</summary>
    public static string Sha256(string path)
    {
        using var fs = new FileStream(path, FileMode.Open, FileAccess.Read, FileShare.Read, 1 << 20);
        return Convert.ToHexStringLower(System.Security.Cryptography.SHA256.HashData(fs));
    }

    private static char? Separator(string path) => Path.GetExtension(path).ToLowerInvariant() switch
    {
        ".jsonl" => null,
        ".csv" => ',',
        ".tsv" => '\t',
        _ => throw new ArgumentException($"{path}: input must be .csv, .tsv or .jsonl."),
    };

    private static InputRecord WithText(long index, long line, string text, RowLimits limits)
    {
        if (text.Length <= limits.MaxChars) return new(index, line, text, null, false);
        if (limits.Reject) return new(index, line, null, $"the text has {text.Length} characters, more than --max-row-chars {limits.MaxChars}", false);
        int cut = char.IsHighSurrogate(text[limits.MaxChars - 1]) ? limits.MaxChars - 1 : limits.MaxChars; // never half a surrogate pair
        return new(index, line, text[..cut], null, true);
    }

    private static IEnumerable<InputRecord> ReadJsonLines(string path, string column, RowLimits limits, string? budgetColumn)
    {
        using var fs = new FileStream(path, FileMode.Open, FileAccess.Read, FileShare.Read, 1);
        var lines = new ByteLineReader(fs, limits.MaxBytes);
        long index = 0;
        while (lines.Next(out var bytes, out bool tooLong))
        {
            if (tooLong)
            {
                yield return new(index++, lines.LineNumber, null, $"the record is over --max-row-bytes {limits.MaxBytes} bytes", false);
                continue;
            }
            if (IsBlank(bytes.Span)) continue;
            yield return ParseJsonRecord(index++, lines.LineNumber, bytes, column, limits, budgetColumn);
        }
    }

    private static bool IsBlank(ReadOnlySpan<byte> line) => line.IndexOfAnyExcept(" \t\r"u8) < 0;

    private static InputRecord ParseJsonRecord(long index, long line, ReadOnlyMemory<byte> bytes, string column, RowLimits limits, string? budgetColumn)
    {
        try
        {
            using var doc = JsonDocument.Parse(bytes);
            if (doc.RootElement.ValueKind != JsonValueKind.Object) return new(index, line, null, $"not a JSON object but {Kind(doc.RootElement.ValueKind)}", false);
            if (!doc.RootElement.TryGetProperty(column, out var v)) return new(index, line, null, $"no property '{column}'", false);
            var record = v.ValueKind switch
            {
                JsonValueKind.String => WithText(index, line, v.GetString()!, limits),
                JsonValueKind.Null => new(index, line, "", null, false),
                _ => new(index, line, null, $"property '{column}' is {Kind(v.ValueKind)}, not a string", false),
            };
            if (budgetColumn is null || !doc.RootElement.TryGetProperty(budgetColumn, out var budget) || budget.ValueKind == JsonValueKind.Null) return record;
            return WithBudget(record, budgetColumn, budget.ValueKind == JsonValueKind.String ? budget.GetString() : budget.GetRawText(), present: true);
        }
        catch (JsonException e)
        {
            return new(index, line, null, $"not valid JSON (at byte {e.BytePositionInLine}: {e.Message.Split(" LineNumber:")[0].TrimEnd()})", false);
        }
        catch (InvalidOperationException)
        {
            // JsonElement.GetString cannot transcode invalid UTF-8 or a lone surrogate escape (found by ParserMutationTests).
            return new(index, line, null, "the text is not valid UTF-8 or holds a lone surrogate escape", false);
        }
    }

    private static string Kind(JsonValueKind k) => k switch
    {
        JsonValueKind.Object => "an object", JsonValueKind.Array => "an array", JsonValueKind.Number => "a number",
        JsonValueKind.True or JsonValueKind.False => "a boolean", JsonValueKind.String => "a string", _ => "null",
    };

    private static IEnumerable<InputRecord> ReadDelimited(string path, string column, char sep, RowLimits limits, string? budgetColumn)
    {
        using var reader = new StreamReader(path);
        long line = 1;
        var header = ReadRecord(reader, sep, MaxHeaderChars, ref line);
        int col = ColumnOf(path, column, header);
        int budgetCol = budgetColumn is null ? -1 : ColumnOf(path, budgetColumn, header);
        long index = 0;
        while (true)
        {
            long start = line;
            if (ReadRecord(reader, sep, limits.MaxBytes, ref line) is not { } record) yield break;
            if (record.Fields is null) yield return new(index++, start, null, $"the record is over --max-row-bytes {limits.MaxBytes} characters", false);
            else if (col >= record.Fields.Count) yield return new(index++, start, null, $"the record has {record.Fields.Count} fields; column '{column}' is field {col + 1}", false);
            else yield return WithBudget(WithText(index++, start, record.Fields[col], limits), budgetColumn,
                budgetCol >= 0 && budgetCol < record.Fields.Count ? record.Fields[budgetCol] : null, budgetCol >= 0 && budgetCol < record.Fields.Count);
        }
    }

    /// <summary>A record's fields, or null fields when it held more than the limit (it is read to its end regardless).</summary>
    private readonly record struct Record(List<string>? Fields);

    /// <summary>One record with RFC 4180 quoting (quoted fields may hold separators, quotes and newlines); counts the lines it spans.</summary>
    private static Record? ReadRecord(TextReader reader, char sep, int maxChars, ref long line)
    {
        int c = reader.Peek();
        if (c < 0) return null;
        var fields = new List<string>();
        var field = new StringBuilder();
        bool quoted = false, over = false;
        long held = 0;
        void Append(char ch)
        {
            if (over) return;
            if (++held > maxChars) { over = true; field.Clear(); fields.Clear(); return; }
            field.Append(ch);
        }
        while ((c = reader.Read()) >= 0)
        {
            char ch = (char)c;
            if (ch == '\n') line++;
            if (quoted)
            {
                if (ch == '"')
                {
                    if (reader.Peek() == '"') { Append('"'); reader.Read(); }
                    else quoted = false;
                }
                else Append(ch);
            }
            else if (ch == '"') quoted = true;
            else if (ch == sep) { if (!over) fields.Add(field.ToString()); field.Clear(); }
            else if (ch == '\n') break;
            else if (ch != '\r') Append(ch);
        }
        if (over) return new Record(null);
        fields.Add(field.ToString());
        return new Record(fields);
    }

    /// <summary>Lines of a stream as bytes, each held only up to a limit (a longer line is consumed and flagged, not kept).</summary>
    private sealed class ByteLineReader(Stream stream, int maxBytes)
    {
        private readonly byte[] _buffer = new byte[1 << 16];
        private int _pos, _len;
        private ArrayBufferWriter<byte> _line = new();
        private bool _first = true;

        /// <summary>1-based number of the line last returned.</summary>
        public long LineNumber { get; private set; }

        public bool Next(out ReadOnlyMemory<byte> line, out bool tooLong)
        {
            // A buffer grown for one long line is not kept for the rest of the file.
            if (_line.Capacity > 1 << 20) _line = new ArrayBufferWriter<byte>();
            _line.ResetWrittenCount();
            tooLong = false;
            bool any = false;
            while (true)
            {
                if (_pos == _len)
                {
                    _len = stream.Read(_buffer);
                    _pos = 0;
                    if (_len == 0) break;
                    if (_first && _buffer.AsSpan(0, _len).StartsWith("\uFEFF"u8)) _pos = 3; // UTF-8 byte order mark
                    _first = false;
                    if (_pos == _len) continue;
                }
                any = true;
                var rest = _buffer.AsSpan(_pos, _len - _pos);
                int nl = rest.IndexOf((byte)'\n');
                var chunk = nl < 0 ? rest : rest[..nl];
                if (!tooLong && _line.WrittenCount + chunk.Length > maxBytes) tooLong = true;
                if (!tooLong) _line.Write(chunk);
                _pos += nl < 0 ? rest.Length : nl + 1;
                if (nl >= 0) break;
            }
            if (!any) { line = default; return false; }
            LineNumber++;
            var written = _line.WrittenMemory;
            line = written.Length > 0 && written.Span[^1] == (byte)'\r' ? written[..^1] : written;
            return true;
        }
    }
}
