using System.Diagnostics;
using AnyPrecML.Models;
using Microsoft.ML.Tokenizers;

namespace AnyPrecML.Evaluation;

/// <summary>The result of a perplexity evaluation.</summary>
/// <param name="Tokens">Tokens predicted (scored).</param>
/// <param name="Nll">Mean negative log-likelihood per scored token, in nats.</param>
/// <param name="Windows">Context windows evaluated.</param>
/// <param name="ContextLength">Tokens per window.</param>
/// <param name="Seconds">Wall time.</param>
public sealed record PerplexityResult(long Tokens, double Nll, int Windows, int ContextLength, double Seconds)
{
    /// <summary>exp(mean NLL).</summary>
    public double Perplexity => Math.Exp(Nll);
}

/// <summary>Progress of a perplexity evaluation: windows done of the total.</summary>
public readonly record struct EvaluationProgress(int Done, int Total);

/// <summary>
/// Perplexity over a text: the text is tokenized once (one BOS at the start) and cut into
/// non-overlapping windows of the context length; each window starts from an empty cache and
/// every token in it but the first is scored against the tokens before it in the window.
/// This is the usual windowing of GPTQ/AWQ/SqueezeLLM perplexity tables (WikiText-2).
/// With <c>bosPerLine</c>, each non-empty line is tokenized as its own document starting with BOS
/// and the documents are joined into the stream: the right framing for one-document-per-line data
/// such as TinyStories, whose models never saw a newline between stories.
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
        if (!bosPerLine) return [.. tokenizer.EncodeToIds(text)];
        var ids = new List<int>();
        foreach (var line in text.Split('\n'))
            if (!string.IsNullOrWhiteSpace(line)) ids.AddRange(tokenizer.EncodeToIds(line.TrimEnd('\r')));
        return ids;
    }

    /// <summary>Mean NLL and perplexity of <paramref name="tokens"/> in windows of <paramref name="contextLength"/> (0: the model's context).</summary>
    public static PerplexityResult Evaluate(IInferenceEngine engine, IReadOnlyList<int> tokens, int contextLength = 0, IProgress<EvaluationProgress>? progress = null, CancellationToken cancellationToken = default)
    {
        var c = engine.Config;
        if (contextLength == 0) contextLength = c.MaxSeqLen;
        if (contextLength < 2 || contextLength > c.MaxSeqLen)
            throw new ArgumentOutOfRangeException(nameof(contextLength), contextLength, $"the context length must be in 2..{c.MaxSeqLen}.");
        if (tokens.Count < 2) throw new ArgumentException($"perplexity needs at least two tokens; the text has {tokens.Count}.", nameof(tokens));

        var sw = Stopwatch.StartNew();
        int windows = (tokens.Count + contextLength - 1) / contextLength;
        // A last window of one token has nothing to score.
        if (tokens.Count % contextLength == 1) windows--;
        double nll = 0;
        long scored = 0;
        var cache = engine.CreateCache(contextLength);
        var logits = new float[Chunk * c.VocabSize];
        var window = new int[contextLength];
        for (int w = 0; w < windows; w++)
        {
            cancellationToken.ThrowIfCancellationRequested();
            int start = w * contextLength, len = Math.Min(contextLength, tokens.Count - start);
            for (int i = 0; i < len; i++) window[i] = tokens[start + i];
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
            progress?.Report(new EvaluationProgress(w + 1, windows));
        }
        return new PerplexityResult(scored, nll / scored, windows, contextLength, sw.Elapsed.TotalSeconds);
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
