using System.Diagnostics;
using System.Runtime.CompilerServices;
using AnyPrecML.Models;
using Microsoft.ML.Tokenizers;

namespace AnyPrecML.Generation;

/// <summary>The result of <see cref="TextGenerator.Generate"/>.</summary>
/// <param name="Text">The completion (the prompt is not repeated).</param>
/// <param name="Tokens">Tokens generated.</param>
/// <param name="PromptTokens">Tokens of the prompt, BOS included.</param>
/// <param name="Seconds">Wall time of prefill and decode.</param>
/// <param name="StopReason">Why it stopped: "eos", "max_tokens" or "context".</param>
public sealed record GenerationResult(string Text, int Tokens, int PromptTokens, double Seconds, string StopReason)
{
    /// <summary>Generated tokens per second of wall time (prefill included).</summary>
    public double TokensPerSecond => Seconds > 0 ? Tokens / Seconds : 0;
}

/// <summary>One step of generation: the token, the text it added, and the stop reason on the last step.</summary>
public readonly record struct GeneratedToken(int Id, string Text, string? StopReason);

/// <summary>Generates text with any <see cref="IInferenceEngine"/>: prefill of the prompt, then one token at a time.</summary>
public sealed class TextGenerator
{
    private readonly IInferenceEngine _engine;
    private readonly Tokenizer _tokenizer;

    /// <summary>A generator over <paramref name="engine"/> that encodes and decodes with <paramref name="tokenizer"/>.</summary>
    public TextGenerator(IInferenceEngine engine, Tokenizer tokenizer)
    {
        _engine = engine ?? throw new ArgumentNullException(nameof(engine));
        _tokenizer = tokenizer ?? throw new ArgumentNullException(nameof(tokenizer));
    }

    /// <summary>
    /// Generates token by token. Each step carries the text that token added (empty while a multi-byte
    /// character is incomplete); the last step carries the stop reason.
    /// </summary>
    public IEnumerable<GeneratedToken> GenerateTokens(string prompt, GenerationOptions options, CancellationToken cancellationToken = default)
    {
        ArgumentNullException.ThrowIfNull(prompt);
        options.Validated();
        var c = _engine.Config;
        List<int> ids = [.. _tokenizer.EncodeToIds(prompt)];
        if (ids.Count == 0 || ids[0] != c.BosTokenId) ids.Insert(0, c.BosTokenId);
        if (ids.Count >= c.MaxSeqLen) throw new ArgumentException($"the prompt has {ids.Count} tokens; the model's context is {c.MaxSeqLen}.", nameof(prompt));
        if (options.MaxTokens == 0) yield break;

        int promptCount = ids.Count;
        string promptText = _tokenizer.Decode(ids);
        var sampler = new Sampler(options);
        var cache = _engine.CreateCache(Math.Min(c.MaxSeqLen, promptCount + options.MaxTokens));
        var logits = new float[c.VocabSize];
        _engine.Forward(System.Runtime.InteropServices.CollectionsMarshal.AsSpan(ids), cache, logits);
        int emittedChars = 0;
        for (int step = 0; ; step++)
        {
            cancellationToken.ThrowIfCancellationRequested();
            int next = sampler.Next(logits);
            if (options.StopAtEos && next == c.EosTokenId) { yield return new GeneratedToken(next, "", "eos"); yield break; }
            ids.Add(next);
            // Decode the whole sequence and emit what is new: SentencePiece joins pieces and bytes
            // across tokens, so a token's text depends on its neighbours.
            string completion = Completion(promptText, ids);
            string piece = "";
            if (!completion.EndsWith('\uFFFD') && completion.Length > emittedChars)
            {
                piece = completion[emittedChars..];
                emittedChars = completion.Length;
            }
            string? stop = step + 1 >= options.MaxTokens ? "max_tokens" : ids.Count >= cache.Capacity ? "context" : null;
            if (stop is not null && emittedChars < completion.Length) { piece += completion[emittedChars..]; emittedChars = completion.Length; }
            yield return new GeneratedToken(next, piece, stop);
            if (stop is not null) yield break;
            _engine.Forward([next], cache, logits);
        }
    }

    /// <summary>Streams the completion of <paramref name="prompt"/> piece by piece as tokens come.</summary>
    public async IAsyncEnumerable<string> StreamAsync(string prompt, GenerationOptions options, [EnumeratorCancellation] CancellationToken cancellationToken = default)
    {
        foreach (var step in GenerateTokens(prompt, options, cancellationToken))
        {
            if (step.Text.Length > 0) yield return step.Text;
            await Task.Yield();
        }
    }

    /// <summary>Generates the whole completion of <paramref name="prompt"/>.</summary>
    public GenerationResult Generate(string prompt, GenerationOptions options, CancellationToken cancellationToken = default)
    {
        var sw = Stopwatch.StartNew();
        var text = new System.Text.StringBuilder();
        int tokens = 0;
        string stop = "max_tokens";
        foreach (var step in GenerateTokens(prompt, options, cancellationToken))
        {
            text.Append(step.Text);
            if (step.StopReason != "eos") tokens++;
            if (step.StopReason is not null) stop = step.StopReason;
        }
        int promptTokens = _tokenizer.EncodeToIds(prompt).Count;
        return new GenerationResult(text.ToString(), tokens, Math.Max(promptTokens, 1), sw.Elapsed.TotalSeconds, stop);
    }

    private string Completion(string promptText, List<int> ids)
    {
        string full = _tokenizer.Decode(ids);
        // The prompt decodes to a prefix of the whole; the rest is the completion.
        return full.StartsWith(promptText, StringComparison.Ordinal) ? full[promptText.Length..] : full;
    }
}
