using System.Diagnostics;
using AnyPrecML.Models;
using Microsoft.ML.Tokenizers;

namespace AnyPrecML.Evaluation;

/// <summary>The result of a perplexity evaluation.</summary>
/// <param name="Tokens">Tokens predicted (scored).</param>
/// <param name="Nll">Mean negative log-likelihood per scored token, in nats.</param>
/// <param name="Windows">Context windows (or documents) evaluated.</param>
/// <param name="ContextLength">Tokens per window (for documents: the longest document).</param>
/// <param name="Seconds">Wall time.</param>
public sealed record PerplexityResult(long Tokens, double Nll, int Windows, int ContextLength, double Seconds)
{
    /// <summary>exp(mean NLL).</summary>
    public double Perplexity => Math.Exp(Nll);
}

/// <summary>Progress of a perplexity evaluation: windows done of the total.</summary>
public readonly record struct EvaluationProgress(int Done, int Total);

/// <summary>
/// Perplexity over a text, two framings. A stream: the text is tokenized once (one BOS at the start)
/// and cut into non-overlapping windows of the context length; each window starts from an empty cache
/// and every token in it but the first is scored against the tokens before it in the window (the
/// usual windowing of GPTQ/AWQ/SqueezeLLM WikiText-2 tables). With <c>bosPerLine</c> each non-empty
/// line is tokenized as its own document starting with BOS and the documents are joined into the stream.
/// Documents (<see cref="Documents(Tokenizer, string, int)"/>): each non-empty line is one sequence, BOS first, truncated to
/// its first N tokens, scored alone from an empty cache with nothing after the cut: the right framing
/// for one-document-per-line data such as TinyStories, and the protocol of docs/QUALITY.md.
/// </summary>
public static class PerplexityEvaluator
{
    /// <summary>Tokens run through the engine at once inside a window, bounding the logits buffer.</summary>
    private const int Chunk = 256;

    /// <summary>Tokenizes <paramref name="text"/> (see <see cref="Tokenize"/>) and evaluates it.</summary>
    public static PerplexityResult Evaluate(IInferenceEngine engine, Tokenizer tokenizer, string text, int contextLength = 0, bool bosPerLine = false, IProgress<EvaluationProgress>? progress = null, CancellationToken cancellationToken = default) =>
        Evaluate(engine, Tokenize(tokenizer, text, bosPerLine), contextLength, progress, cancellationToken);

    /// <summary>The token stream <see cref="Evaluate(IInferenceEngine, Tokenizer, string, int, bool, IProgress{EvaluationProgress}, CancellationToken)"/> scores.</summary>
    public static List<int> Tokenize(Tokenizer tokenizer, string text, bool bosPerLine)
    {
        ArgumentNullException.ThrowIfNull(text);
        if (string.IsNullOrWhiteSpace(text)) throw new ArgumentException("the text is empty; perplexity needs at least two tokens.", nameof(text));
        return [.. TokenStream(tokenizer, new StringReader(text), bosPerLine)];
    }

    /// <summary>
    /// The tokens of the text <paramref name="reader"/> holds, read and tokenized piece by piece (<see cref="TextPieces"/>):
    /// one BOS at the start, or with <paramref name="bosPerLine"/> each non-empty line as a document starting with BOS.
    /// Memory is bounded by one piece, whatever the length of the text or of its lines.
    /// </summary>
    public static IEnumerable<int> TokenStream(Tokenizer tokenizer, TextReader reader, bool bosPerLine)
    {
        if (bosPerLine) return Documents(tokenizer, reader, 0).SelectMany(d => d);
        return Stream();
        IEnumerable<int> Stream()
        {
            bool first = true;
            foreach (var (piece, _) in TextPieces.Read(reader, tokenizer, splitLines: false))
            {
                foreach (int id in Encode(tokenizer, piece, first)) yield return id;
                first = false;
            }
        }
    }

    /// <summary>
    /// Each non-empty line of <paramref name="text"/> as one document: BOS and its tokens, cut to the first
    /// <paramref name="truncate"/> tokens (BOS included; 0: whole lines).
    /// </summary>
    public static List<int[]> Documents(Tokenizer tokenizer, string text, int truncate)
    {
        ArgumentNullException.ThrowIfNull(text);
        return [.. Documents(tokenizer, new StringReader(text), truncate)];
    }

    /// <summary>
    /// The documents of <see cref="Documents(Tokenizer, string, int)"/>, streamed: a line is read and tokenized piece by
    /// piece, and once a document has <paramref name="truncate"/> tokens the rest of its line is read past, not tokenized.
    /// </summary>
    public static IEnumerable<int[]> Documents(Tokenizer tokenizer, TextReader reader, int truncate)
    {
        ArgumentNullException.ThrowIfNull(reader);
        ArgumentOutOfRangeException.ThrowIfNegative(truncate);
        return Read();
        IEnumerable<int[]> Read()
        {
            var doc = new List<int>();
            bool lineStart = true;
            foreach (var (piece, endsLine) in TextPieces.Read(reader, tokenizer, splitLines: true))
            {
                bool blankLine = lineStart && endsLine && string.IsNullOrWhiteSpace(piece);
                if (!blankLine && (truncate == 0 || doc.Count < truncate))
                    doc.AddRange(Encode(tokenizer, endsLine ? piece.TrimEnd('\r') : piece, lineStart));
                lineStart = endsLine;
                if (!endsLine || blankLine) continue;
                yield return [.. truncate > 0 ? doc.Take(truncate) : doc];
                doc.Clear();
            }
        }
    }

    /// <summary>The ids of one piece; BOS (when the tokenizer adds one) only for the first piece of a document.</summary>
    private static IReadOnlyList<int> Encode(Tokenizer tokenizer, string piece, bool first) =>
        first || tokenizer is not SentencePieceTokenizer sp ? tokenizer.EncodeToIds(piece) : sp.EncodeToIds(piece, addBeginningOfSentence: false, addEndOfSentence: false);

    /// <summary>The non-overlapping windows of <paramref name="contextLength"/> tokens of a stream (a last window of one token has nothing to score and is dropped).</summary>
    public static List<int[]> Windows(IEnumerable<int> tokens, int contextLength)
    {
        ArgumentOutOfRangeException.ThrowIfLessThan(contextLength, 2);
        var windows = new List<int[]>();
        var window = new int[contextLength];
        int filled = 0;
        foreach (int id in tokens)
        {
            window[filled++] = id;
            if (filled < contextLength) continue;
            windows.Add(window);
            window = new int[contextLength];
            filled = 0;
        }
        if (filled >= 2) windows.Add(window[..filled]);
        return windows;
    }

    /// <summary>Mean NLL and perplexity of <paramref name="tokens"/> in windows of <paramref name="contextLength"/> (0: the model's context).</summary>
    public static PerplexityResult Evaluate(IInferenceEngine engine, IReadOnlyList<int> tokens, int contextLength = 0, IProgress<EvaluationProgress>? progress = null, CancellationToken cancellationToken = default)
    {
        if (contextLength == 0) contextLength = engine.Config.MaxSeqLen;
        if (contextLength < 2 || contextLength > engine.Config.MaxSeqLen)
            throw new ArgumentOutOfRangeException(nameof(contextLength), contextLength, $"the context length must be in 2..{engine.Config.MaxSeqLen}.");
        if (tokens.Count < 2) throw new ArgumentException($"perplexity needs at least two tokens; the text has {tokens.Count}.", nameof(tokens));
        return EvaluateSequences(engine, Windows(tokens, contextLength), progress, cancellationToken) with { ContextLength = contextLength };
    }

    /// <summary>
    /// Mean NLL and perplexity over <paramref name="sequences"/>, each run alone from an empty cache with
    /// every token but its first scored. <see cref="PerplexityResult.ContextLength"/> is the longest sequence.
    /// </summary>
    public static PerplexityResult EvaluateSequences(IInferenceEngine engine, IReadOnlyList<int[]> sequences, IProgress<EvaluationProgress>? progress = null, CancellationToken cancellationToken = default)
    {
        var c = engine.Config;
        if (sequences.Count == 0 || sequences.All(q => q.Length < 2)) throw new ArgumentException("perplexity needs a sequence of at least two tokens.", nameof(sequences));
        int longest = sequences.Max(q => q.Length);
        if (longest > c.MaxSeqLen) throw new ArgumentOutOfRangeException(nameof(sequences), longest, $"a sequence of {longest} tokens exceeds the model's context of {c.MaxSeqLen}; truncate or window it.");

        var sw = Stopwatch.StartNew();
        double nll = 0;
        long scored = 0;
        var cache = engine.CreateCache(longest);
        var logits = new float[Chunk * c.VocabSize];
        for (int w = 0; w < sequences.Count; w++)
        {
            cancellationToken.ThrowIfCancellationRequested();
            var window = sequences[w];
            int len = window.Length;
            cache.Reset();
            for (int s = 0; s < len - 1; s += Chunk)
            {
                // Run tokens [s, e) and score their successors [s+1, e+1).
                int e = Math.Min(len - 1, s + Chunk);
                engine.Forward(window.AsSpan(s, e - s), cache, logits.AsSpan(0, (e - s) * c.VocabSize));
                for (int t = s; t < e; t++)
                    nll += NegativeLogLikelihood(logits.AsSpan((t - s) * c.VocabSize, c.VocabSize), window[t + 1]);
                scored += e - s;
            }
            progress?.Report(new EvaluationProgress(w + 1, sequences.Count));
        }
        return new PerplexityResult(scored, nll / scored, sequences.Count, longest, sw.Elapsed.TotalSeconds);
    }

    /// <summary>−log softmax(logits)[target], computed in float64.</summary>
    public static double NegativeLogLikelihood(ReadOnlySpan<float> logits, int target)
    {
        float max = System.Numerics.Tensors.TensorPrimitives.Max(logits);
        double sum = 0;
        foreach (float l in logits) sum += Math.Exp(l - max);
        return Math.Log(sum) + max - logits[target];
    }
}
