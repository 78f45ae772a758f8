using System.Text;
using System.Text.Json;
using AnyPrecML.Models;

namespace AnyPrecML.Cli;

/// <summary>
/// The files of one `score` job: the output (held under an exclusive lock for the whole run), the errors file, and the
/// manifest beside the output that says what produced them and how far the last durable checkpoint got.
/// </summary>
/// <remarks>
/// A checkpoint fsyncs the output and errors files, then replaces the manifest (temporary file, fsync, rename) with
/// the rows done and both files' lengths at that moment. After a kill at any instant the manifest describes a prefix
/// that is on disk; a resumed run cuts both files back to it and redoes the rows after it, so the result is
/// byte-identical to an uninterrupted run.
/// </remarks>
internal sealed class ScoreJob : IDisposable
{
    private readonly FileStream _output;
    private FileStream? _errors;
    private readonly string _outputPath, _errorsPath, _manifestPath;
    private readonly bool _created;
    private ScoreManifest.JobIdentity? _identity;

    private ScoreJob(FileStream output, string outputPath, string errorsPath, bool created)
    {
        _output = output; _outputPath = outputPath; _errorsPath = errorsPath; _manifestPath = ManifestPath(outputPath); _created = created;
    }

    /// <summary>The manifest of the job writing <paramref name="outputPath"/>.</summary>
    public static string ManifestPath(string outputPath) => outputPath + ".manifest.json";

    /// <summary>Opens <paramref name="outputPath"/> under an exclusive lock; a second job on the same output is refused at once.</summary>
    public static ScoreJob Lock(string outputPath, string errorsPath)
    {
        Directory.CreateDirectory(Path.GetDirectoryName(outputPath)!);
        // FileShare.None takes an exclusive advisory lock (flock) on Unix and a sharing lock on Windows; the file is
        // opened without truncation, so a refused second run changes nothing.
        bool created = !File.Exists(outputPath);
        try
        {
            return new ScoreJob(new FileStream(outputPath, FileMode.OpenOrCreate, FileAccess.ReadWrite, FileShare.None, 1 << 16), outputPath, errorsPath, created);
        }
        catch (IOException e) when (e is not (FileNotFoundException or DirectoryNotFoundException or PathTooLongException) && File.Exists(outputPath))
        {
            throw new IOException($"{outputPath}: another score run is writing this file (it is locked); wait for it to finish or choose another --output.", e);
        }
    }

    /// <summary>
    /// Checks what is already there against <paramref name="identity"/> and returns the rows done: 0 for a new job, the
    /// last checkpoint's count for <paramref name="resume"/> of the same job. Refuses to mix jobs or to overwrite silently.
    /// </summary>
    public long Start(ScoreManifest.JobIdentity identity, bool resume)
    {
        var manifest = ScoreManifest.TryRead(_manifestPath);
        bool earlierRows = _output.Length > 0 || manifest?.RowsDone > 0;
        long done = 0, outputBytes = 0, errorsBytes = 0;
        if (earlierRows)
        {
            if (!resume)
                throw new IOException($"{_outputPath}: holds rows of an earlier run; pass --resume to continue it, or remove it and {Path.GetFileName(_manifestPath)} to start again.");
            if (manifest is null)
                throw new IOException($"{_outputPath}: has no manifest ({Path.GetFileName(_manifestPath)}), so the job that wrote it cannot be checked; remove it to start again.");
            manifest.Identity.CheckSameJob(identity, _manifestPath);
            if (_output.Length < manifest.OutputBytes)
                throw new InvalidDataException($"{_outputPath}: is {_output.Length} bytes, shorter than its last checkpoint ({manifest.OutputBytes}); it was changed outside score, remove it to start again.");
            (done, outputBytes, errorsBytes) = (manifest.RowsDone, manifest.OutputBytes, manifest.ErrorsBytes);
        }
        _output.SetLength(outputBytes);
        _output.Seek(0, SeekOrigin.End);
        if (File.Exists(_errorsPath) || errorsBytes > 0)
        {
            OpenErrors();
            if (_errors!.Length < errorsBytes)
                throw new InvalidDataException($"{_errorsPath}: is {_errors.Length} bytes, shorter than its last checkpoint ({errorsBytes}); it was changed outside score.");
            _errors.SetLength(errorsBytes);
            _errors.Seek(0, SeekOrigin.End);
        }
        _identity = identity;
        Checkpoint(done, complete: false);
        return done;
    }

    public void WriteOutput(string line) => _output.Write(Encoding.UTF8.GetBytes(line + "\n"));

    public void WriteError(string line)
    {
        if (_errors is null) OpenErrors();
        _errors!.Write(Encoding.UTF8.GetBytes(line + "\n"));
    }

    private void OpenErrors() => _errors = new FileStream(_errorsPath, FileMode.OpenOrCreate, FileAccess.ReadWrite, FileShare.Read, 1 << 16);

    /// <summary>Makes everything written so far durable, then records it in the manifest.</summary>
    public void Checkpoint(long rowsDone, bool complete)
    {
        _output.Flush(flushToDisk: true);
        _errors?.Flush(flushToDisk: true);
        new ScoreManifest(_identity!, rowsDone, _output.Length, _errors?.Length ?? 0, complete).Write(_manifestPath);
    }

    /// <summary>Closes the files; an output this run created and never started (it failed before its first row) is removed.</summary>
    public void Dispose()
    {
        _errors?.Dispose();
        bool unused = _created && _identity is null && _output.Length == 0;
        _output.Dispose();
        if (unused) File.Delete(_outputPath);
    }
}

/// <summary>The sidecar manifest of a `score` output (&lt;output&gt;.manifest.json).</summary>
internal sealed record ScoreManifest(ScoreManifest.JobIdentity Identity, long RowsDone, long OutputBytes, long ErrorsBytes, bool Complete)
{
    public const string Format = "anyprec-score-manifest/1";

    /// <summary>Everything that decides an output row: resuming with any of it changed would mix two jobs in one file.</summary>
    public sealed record JobIdentity(string ModelSha256, int Bits, string Input, string InputSha256, string Column, int CompletionTokens,
        string Engine, int MaxRowChars, string LongRows, int MaxRowBytes, string? Widths = null)
    {
        /// <summary>Throws naming the first difference (the input is compared by content; its path may change).</summary>
        public void CheckSameJob(JobIdentity now, string manifestPath)
        {
            (string What, object Then, object Now)[] fields =
            [
                ("model (content SHA-256)", ModelSha256, now.ModelSha256), ("width (--bits)", Bits, now.Bits),
                ("input (content SHA-256)", $"{InputSha256} of {Input}", $"{now.InputSha256} of {now.Input}"), ("--column", Column, now.Column),
                ("--completion-tokens", CompletionTokens, now.CompletionTokens), ("--engine", Engine, now.Engine),
                ("--max-row-chars", MaxRowChars, now.MaxRowChars), ("--long-rows", LongRows, now.LongRows), ("--max-row-bytes", MaxRowBytes, now.MaxRowBytes),
                ("widths (--profile, --budget-column, --over-budget)", Widths ?? "", now.Widths ?? ""),
            ];
            foreach (var (what, then, current) in fields)
            {
                bool same = what.StartsWith("input", StringComparison.Ordinal) ? InputSha256 == now.InputSha256 : Equals(then, current);
                if (!same)
                    throw new ArgumentException($"{manifestPath}: --resume refused: the output was written with {what} {then}, this run has {current}; use another --output for a different job.");
            }
        }
    }

    private static readonly JsonSerializerOptions Options = new() { WriteIndented = true, PropertyNamingPolicy = JsonNamingPolicy.SnakeCaseLower };

    private sealed record OnDisk(string Format, JobIdentity Identity, long RowsDone, long OutputBytes, long ErrorsBytes, bool Complete);

    public void Write(string path) =>
        AtomicFile.WriteText(path, JsonSerializer.Serialize(new OnDisk(Format, Identity, RowsDone, OutputBytes, ErrorsBytes, Complete), Options));

    /// <summary>The manifest at <paramref name="path"/>, or null when there is none; a damaged one is an error naming it.</summary>
    public static ScoreManifest? TryRead(string path)
    {
        if (!File.Exists(path)) return null;
        OnDisk? m;
        try { m = JsonSerializer.Deserialize<OnDisk>(File.ReadAllText(path), Options); }
        catch (JsonException e) { throw new InvalidDataException($"{path}: not a score manifest (invalid JSON at byte {e.BytePositionInLine}); remove it and the output to start again.", e); }
        if (m is null || m.Format != Format || m.Identity is null || m.RowsDone < 0 || m.OutputBytes < 0 || m.ErrorsBytes < 0)
            throw new InvalidDataException($"{path}: not a {Format} manifest; remove it and the output to start again.");
        return new ScoreManifest(m.Identity, m.RowsDone, m.OutputBytes, m.ErrorsBytes, m.Complete);
    }
}
