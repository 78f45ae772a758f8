using AnyPrecML.Cli;
using AnyPrecML.MLNet.Scoring;
using AnyPrecML.Models;
using AnyPrecML.Quantization;
using AnyPrecML.Reference;
using AnyPrecML.Tokenization;

namespace AnyPrecML.Fuzz;

/// <summary>
/// One parser of untrusted input, fed one file: <see cref="Feed"/> writes the input where the parser reads it (beside
/// fixed, valid companion files in the workspace) and runs it. Returning, or throwing the parser's own format error,
/// is a pass; any other exception is a crash.
/// </summary>
public sealed record FuzzTarget(string Name, string What, Action<FuzzWorkspace, byte[]> Feed, params Type[] Rejections);

/// <summary>An input that a parser did not handle: an exception other than its format error, or too much memory.</summary>
public sealed class FuzzFailure(string message, Exception? inner = null) : Exception(message, inner);

/// <summary>The fuzz targets: every reader of a file the user hands us.</summary>
public static class FuzzTargets
{
    /// <summary>
    /// Managed bytes one input may allocate: 2 × its size plus a fixed part for the parsers' fixed costs (JSON
    /// documents, the 64 KiB line buffer, the tokenizer's tables of a tiny vocabulary). A header that drives an
    /// allocation by a size it claims, not one it has, exceeds it at once.
    /// </summary>
    public const long FixedAllocationBytes = 4 << 20;

    // score's readers with small limits, so that short fuzz inputs reach the over-length paths too.
    private static readonly RowLimits ScoreLimits = new(MaxChars: 64, Reject: false, MaxBytes: 256);

    public static readonly IReadOnlyList<FuzzTarget> All =
    [
        new("llama2c", "llama2.c .bin checkpoint (v0 and v1 headers, tensor layout, finite check)", (w, input) =>
        {
            w.Write("m.bin", input);
            using var cp = LlamaCheckpoint.Open(w.PathOf("m.bin"));
            LlamaWeights.FromCheckpoint(cp);
        }, typeof(ModelFormatException)),

        new("safetensors", "safetensors file of a Hugging Face directory (header, offsets, dtypes, shapes against config.json)", (w, input) =>
        {
            w.Write("hf/model.safetensors", input);
            using var cp = LlamaCheckpoint.Open(w.PathOf("hf"));
            LlamaWeights.FromCheckpoint(cp);
        }, typeof(ModelFormatException)),

        new("hf-config", "Hugging Face config.json", (w, input) =>
        {
            w.Write("config.json", input);
            LlamaCheckpoint.ReadHuggingFaceConfig(w.PathOf("config.json"));
        }, typeof(ModelFormatException)),

        new("hf-index", "model.safetensors.index.json of a sharded Hugging Face directory", (w, input) =>
        {
            w.Write("sharded/model.safetensors.index.json", input);
            using var cp = LlamaCheckpoint.Open(w.PathOf("sharded"));
        }, typeof(ModelFormatException)),

        new("ap-config", "config.json of an any-precision directory (the Llama fields and the anyprecision section)",
            (w, input) => OpenAnyPrecision(w, "ap", "config.json", input), typeof(ModelFormatException)),

        new("ap-safetensors", "model.safetensors of an any-precision directory (bitplanes and centroid tables)",
            (w, input) => OpenAnyPrecision(w, "ap-data", "model.safetensors", input), typeof(ModelFormatException)),

        new("tokenizer", "SentencePiece tokenizer.model (loaded, then used to encode and decode)", (w, input) =>
        {
            w.Write("tokenizer.model", input);
            var tok = LlamaTokenizerLoader.Load(w.PathOf("tokenizer.model"));
            var ids = tok.EncodeToIds("Once upon a time, ünïcödé 🙂 <s> \t\n end");
            tok.Decode(ids);
        }, typeof(ModelFormatException)),

        new("score-jsonl", "score's JSONL input reader", (w, input) => ReadScoreInput(w, "in.jsonl", input)),

        new("score-csv", "score's CSV input reader (RFC 4180 quoting)", (w, input) => ReadScoreInput(w, "in.csv", input), typeof(FormatException)),
    ];

    public static FuzzTarget Named(string name) => All.FirstOrDefault(t => t.Name == name)
        ?? throw new ArgumentException($"no fuzz target '{name}'; targets: {string.Join(", ", All.Select(t => t.Name))}");

    /// <summary>Opens the any-precision directory with <paramref name="file"/> replaced, and dequantizes it at both ends of its widths.</summary>
    private static void OpenAnyPrecision(FuzzWorkspace w, string directory, string file, byte[] input)
    {
        w.Write(Path.Combine(directory, file), input);
        using var model = AnyPrecisionModel.Open(w.PathOf(directory));
        model.ToWeights(model.SeedBits);
        model.ToWeights(model.ParentBits);
    }

    private static void ReadScoreInput(FuzzWorkspace w, string file, byte[] input)
    {
        w.Write(file, input);
        string path = w.PathOf(file);
        ScoreInput.Check(path, "text");
        foreach (var r in ScoreInput.Read(path, "text", ScoreLimits))
        {
            if ((r.Text is null) == (r.Problem is null)) throw new FuzzFailure($"record {r.Index} (line {r.Line}) has {(r.Text is null ? "neither a text nor a problem" : "both a text and a problem")}");
            if (r.Text is { } t && t.Length > ScoreLimits.MaxChars) throw new FuzzFailure($"record {r.Index} has {t.Length} characters, over the limit {ScoreLimits.MaxChars}");
        }
    }

    /// <summary>
    /// Runs <paramref name="target"/> on <paramref name="input"/>: true when the parser accepted it, false when it rejected
    /// it with its format error; throws <see cref="FuzzFailure"/> when it crashed or allocated too much.
    /// </summary>
    public static bool Run(FuzzTarget target, FuzzWorkspace workspace, byte[] input)
    {
        long before = GC.GetAllocatedBytesForCurrentThread();
        bool accepted = true;
        try { target.Feed(workspace, input); }
        catch (FuzzFailure) { throw; }
        catch (Exception e) when (target.Rejections.Any(r => r.IsInstanceOfType(e)))
        {
            if (e.Message.Contains('\n')) throw new FuzzFailure($"{target.Name}: the error spans lines: {e.Message}", e);
            accepted = false;
        }
        catch (Exception e) { throw new FuzzFailure($"{target.Name}: {e.GetType().FullName} escaped: {e.Message}", e); }
        long allocated = GC.GetAllocatedBytesForCurrentThread() - before;
        if (allocated > 2L * input.Length + FixedAllocationBytes)
            throw new FuzzFailure($"{target.Name}: allocated {allocated} bytes for a {input.Length}-byte input (limit 2 × size + {FixedAllocationBytes})");
        return accepted;
    }
}

/// <summary>
/// A directory holding each target's fixed companion files (a valid config.json beside a fuzzed safetensors file, and
/// so on), built once per process; the fuzzed file is rewritten in place for every input.
/// </summary>
public sealed class FuzzWorkspace : IDisposable
{
    private FuzzWorkspace(string root) => Root = root;

    public string Root { get; }

    public string PathOf(string relative) => Path.Combine(Root, relative);

    public void Write(string relative, byte[] bytes) => File.WriteAllBytes(PathOf(relative), bytes);

    /// <summary>A fresh workspace under /dev/shm when there is one (inputs are rewritten thousands of times a second), else the temporary directory.</summary>
    public static FuzzWorkspace Create()
    {
        string parent = Directory.Exists("/dev/shm") ? "/dev/shm" : Path.GetTempPath();
        var w = new FuzzWorkspace(Directory.CreateDirectory(Path.Combine(parent, $"anyprec-fuzz-{Environment.ProcessId}-{Guid.NewGuid():N}")).FullName);
        Seeds.WriteHuggingFace(w.PathOf("hf"));
        Seeds.WriteSharded(w.PathOf("sharded"));
        Seeds.WriteAnyPrecision(w.PathOf("ap"));
        Seeds.WriteAnyPrecision(w.PathOf("ap-data"));
        return w;
    }

    public void Dispose()
    {
        try { Directory.Delete(Root, recursive: true); } catch (IOException) { }
    }
}
