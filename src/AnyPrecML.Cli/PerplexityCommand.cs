using System.CommandLine;
using AnyPrecML.Evaluation;

namespace AnyPrecML.Cli;

/// <summary>`anyprec perplexity`: mean NLL and perplexity of a text file.</summary>
internal static class PerplexityCommand
{
    public static Command Create()
    {
        var model = CommonOptions.Model();
        var tokenizer = CommonOptions.Tokenizer();
        var json = CommonOptions.Json();
        var bits = CommonOptions.Width();
        var profile = CommonOptions.Profile();
        var engine = CommonOptions.Engine();
        var accuracy = CommonOptions.Accuracy();
        var kvCache = CommonOptions.KvCache();
        var device = CommonOptions.Device();
        var text = new Option<string>("--text") { Description = "Text file to evaluate.", Required = true };
        var context = new Option<int>("--context", "-c") { Description = "Tokens per window (0: the model's context).", DefaultValueFactory = _ => 0 };
        var bosPerLine = new Option<bool>("--bos-per-line") { Description = "Treat each non-empty line as a document starting with BOS (one-story-per-line data such as TinyStories)." };
        var truncate = Truncate();
        var command = new Command("perplexity", "Perplexity of a text in non-overlapping windows of the context length, or (--bos-per-line --truncate N) of each line on its first N tokens.")
        {
            model, tokenizer, bits, profile, engine, accuracy, device, kvCache, text, context, bosPerLine, truncate, json,
        };
        command.SetAction((r, ct) =>
        {
            using var m = CommonOptions.Load(r.GetValue(model)!, r.GetValue(tokenizer), r.GetValue(bits), r.GetValue(engine), r.GetValue(accuracy), r.GetValue(device)!, r.Err(), r.GetValue(profile), r.GetValue(kvCache));
            string path = r.GetValue(text)!;
            if (!File.Exists(path)) throw new FileNotFoundException($"Text file '{path}' does not exist.", path);
            var progress = new ConsoleProgress<EvaluationProgress>(r.Err(), "perplexity", p => (p.Done, p.Total));
            int cut = r.GetValue(truncate);
            List<int[]> sequences;
            using (var reader = new StreamReader(path)) sequences = Sequences(m.Tokenizer, reader, r.GetValue(bosPerLine), cut, r.GetValue(context), m.Engine.Config.MaxSeqLen);
            var result = PerplexityEvaluator.EvaluateSequences(m.Engine, sequences, progress, ct);
            string framing = cut > 0 ? "documents" : "windows";
            if (r.GetValue(json))
                r.WriteJson(new { tokens = result.Tokens, nll = Math.Round(result.Nll, 6), perplexity = Math.Round(result.Perplexity, 4), framing, windows = result.Windows, context = result.ContextLength, widths = Widths(m.Engine), peak_resident_bytes = ScoreCommand.PeakResidentBytes() });
            else if (cut > 0)
                r.Out().WriteLine($"{result.Tokens} tokens scored in {result.Windows} documents (first {cut} tokens each, BOS included): nll {result.Nll:F4} nats/token, perplexity {result.Perplexity:F3} ({result.Seconds:F1} s)");
            else
                r.Out().WriteLine($"{result.Tokens} tokens in {result.Windows} windows of {result.ContextLength}: nll {result.Nll:F4} nats/token, perplexity {result.Perplexity:F3} ({result.Seconds:F1} s)");
            return Task.FromResult(0);
        });
        return command;
    }

    /// <summary>What widths ran, for --json: {"bits", "average_bits", "profile"} of an any-precision model, else null.</summary>
    public static object? Widths(Models.IInferenceEngine engine) => engine switch
    {
        Quantization.ProfiledEngine p => new { bits = (int?)null, average_bits = Math.Round(p.Profile.AverageBits, 4), profile = (IReadOnlyList<int>?)p.Profile.Widths },
        Models.IAnyPrecisionEngine e => new { bits = (int?)e.Bits, average_bits = (double)e.Bits, profile = (IReadOnlyList<int>?)null },
        _ => null,
    };

    public static Option<int> Truncate() => new("--truncate")
    {
        Description = "With --bos-per-line: score each line alone on its first N tokens (BOS included) from an empty cache, nothing after them (0: windows over the joined stream).",
        DefaultValueFactory = _ => 0,
    };

    /// <summary>
    /// What to score: documents cut to <paramref name="truncate"/> tokens, or windows of <paramref name="context"/> over the
    /// stream. The text is read and tokenized in pieces (<see cref="TextPieces"/>), so a line of any length costs one
    /// piece of tokenizer memory; what is kept is the tokens scored (4 bytes each), and with --truncate a line is read
    /// past once its document is full.
    /// </summary>
    public static List<int[]> Sequences(Microsoft.ML.Tokenizers.Tokenizer tokenizer, TextReader text, bool bosPerLine, int truncate, int context, int maxSeqLen)
    {
        if (truncate < 0) throw new ArgumentException($"--truncate {truncate} must be ≥ 0.");
        if (truncate == 0)
        {
            if (context == 0) context = maxSeqLen;
            if (context < 2 || context > maxSeqLen) throw new ArgumentException($"--context {context} must be in 2..{maxSeqLen}.");
            var windows = PerplexityEvaluator.Windows(PerplexityEvaluator.TokenStream(tokenizer, text, bosPerLine), context);
            if (windows.Count == 0) throw new ArgumentException("perplexity needs at least two tokens; the text has fewer.");
            return windows;
        }
        if (!bosPerLine) throw new ArgumentException("--truncate scores each line as a document: give --bos-per-line too.");
        if (context != 0) throw new ArgumentException("--truncate and --context are two framings; give one.");
        if (truncate < 2 || truncate > maxSeqLen) throw new ArgumentException($"--truncate {truncate} must be in 2..{maxSeqLen} (the model's context).");
        var documents = PerplexityEvaluator.Documents(tokenizer, text, truncate).ToList();
        if (documents.Count == 0) throw new ArgumentException("the text is empty; perplexity needs at least two tokens.");
        return documents;
    }
}
