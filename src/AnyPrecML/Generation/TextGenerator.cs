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
/// <param name="Speculation">Drafted and accepted tokens and target passes of speculative decoding; null without a draft.</param>
public sealed record GenerationResult(string Text, int Tokens, int PromptTokens, double Seconds, string StopReason, SpeculationStats? Speculation = null)
{
    /// <summary>Generated tokens per second of wall time (prefill included).</summary>
    public double TokensPerSecond => Seconds > 0 ? Tokens / Seconds : 0;
    /// <summary>Generated tokens per verify pass of the target (speculative decoding; 0 otherwise).</summary>
    public double TokensPerTargetStep => Speculation is { TargetSteps: > 0 } s ? (double)Tokens / s.TargetSteps : 0;
}

/// <summary>One step of generation: the token, the text it added, and the stop reason on the last step.</summary>
public readonly record struct GeneratedToken(int Id, string Text, string? StopReason);

/// <summary>
/// Generates text with any <see cref="IInferenceEngine"/>: prefill of the prompt, then one token at a time, or, with
/// <see cref="GenerationOptions.DraftBits"/> on an <see cref="IAnyPrecisionEngine"/>, in speculative rounds
/// (<see cref="SpeculativeGenerator"/>) with the engine's width as the target.
/// </summary>
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
    /// Key/value caches kept between calls for target-only decoding (null: none): a prompt that starts with tokens of an
    /// earlier generation's cache prefills only the rest (see <see cref="Generation.PromptCache"/>). One per engine and width.
    /// </summary>
    public PromptCache? PromptCache { get; init; }

    /// <summary>
    /// Generates token by token. Each step carries the text that token added (empty while a multi-byte
    /// character is incomplete); the last step carries the stop reason.
    /// </summary>
    public IEnumerable<GeneratedToken> GenerateTokens(string prompt, GenerationOptions options, CancellationToken cancellationToken = default) =>
        GenerateTokens(prompt, options, null, cancellationToken);

    /// <summary>
    /// <see cref="GenerateTokens(string, GenerationOptions, CancellationToken)"/>, handing speculative decoding's counters to
    /// <paramref name="speculation"/> when decoding starts (they grow as it goes; not called without a draft width).
    /// </summary>
    public IEnumerable<GeneratedToken> GenerateTokens(string prompt, GenerationOptions options, Action<SpeculationStats>? speculation, CancellationToken cancellationToken = default)
    {
        ArgumentNullException.ThrowIfNull(prompt);
        options.Validated();
        if (options.DraftBits is not null && _engine is not IAnyPrecisionEngine)
            throw new ArgumentException("speculative decoding (a draft width) needs an any-precision model and engine.", nameof(options));
        var c = _engine.Config;
        List<int> ids = [.. _tokenizer.EncodeToIds(prompt)];
        if (ids.Count == 0 || ids[0] != c.BosTokenId) ids.Insert(0, c.BosTokenId);
        if (ids.Count >= c.MaxSeqLen) throw new ArgumentException($"the prompt has {ids.Count} tokens; the model's context is {c.MaxSeqLen}.", nameof(prompt));
        if (options.MaxTokens == 0) yield break;

        int promptCount = ids.Count;
        string promptText = _tokenizer.Decode(ids);
        var sampler = new Sampler(options);
        int limit = Math.Min(c.MaxSeqLen, promptCount + options.MaxTokens);
        var tokens = options.DraftBits is null ? TargetOnly([.. ids], sampler, limit) : Speculative([.. ids], options, sampler, limit, speculation);
        int emittedChars = 0, step = 0;
        foreach (int next in tokens)
        {
            cancellationToken.ThrowIfCancellationRequested();
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
            string? stop = ++step >= options.MaxTokens ? "max_tokens" : ids.Count >= limit ? "context" : null;
            if (stop is not null && emittedChars < completion.Length) { piece += completion[emittedChars..]; emittedChars = completion.Length; }
            yield return new GeneratedToken(next, piece, stop);
            if (stop is not null) yield break;
        }
    }

    /// <summary>Target-only decoding: one forward pass per token.</summary>
    private IEnumerable<int> TargetOnly(int[] prompt, Sampler sampler, int capacity)
    {
        // A kept cache that already holds the prompt's start (the conversation so far) saves prefilling it. Caches that may
        // be kept are made in whole 256-position steps, so a conversation's next turns mostly fit without a copy.
        if (PromptCache is not null) capacity = Math.Min(_engine.Config.MaxSeqLen, (capacity + 255) & ~255);
        var (cache, start) = PromptCache?.Take(prompt, capacity, _engine.CreateCache) ?? (_engine.CreateCache(capacity), 0);
        var fed = new List<int>(prompt.AsSpan(0, start).ToArray());
        bool whole = true; // false while a forward pass is under way: a pass that throws leaves the cache unfit to keep
        try
        {
            var logits = new float[_engine.Config.VocabSize];
            // The prompt but its last token in one call, then the last as a decode step: as speculative decoding feeds it
            // (its first verification pass), so both give that token bit for bit the same logits. In one call with the
            // rest, a prompt of CausalAttention.BlockedTokens or more attends it in the blocked products, whose sums run in
            // another order.
            whole = false;
            if (prompt.Length - 1 > start) _engine.Forward(prompt.AsSpan(start, prompt.Length - 1 - start), cache, new float[_engine.Config.VocabSize]);
            _engine.Forward(prompt.AsSpan(prompt.Length - 1), cache, logits);
            whole = true;
            fed.AddRange(prompt.AsSpan(start));
            while (true)
            {
                int next = sampler.Next(logits);
                yield return next;
                whole = false;
                _engine.Forward([next], cache, logits);
                whole = true;
                fed.Add(next);
            }
        }
        finally
        {
            if (whole) PromptCache?.Return(cache, [.. fed]);
        }
    }

    /// <summary>Speculative decoding at the engine's width with a narrower draft: rounds of 1..k + 1 tokens.</summary>
    private IEnumerable<int> Speculative(int[] prompt, GenerationOptions options, Sampler sampler, int limit, Action<SpeculationStats>? speculation)
    {
        // Room for a whole round past the last token emitted.
        int capacity = Math.Min(_engine.Config.MaxSeqLen, limit + options.DraftTokens);
        var generator = new SpeculativeGenerator((IAnyPrecisionEngine)_engine, prompt, options, sampler, capacity: capacity);
        speculation?.Invoke(generator.Stats);
        while (true)
            foreach (int next in generator.NextRound())
                yield return next;
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
        SpeculationStats? speculation = null;
        foreach (var step in GenerateTokens(prompt, options, s => speculation = s, cancellationToken))
        {
            text.Append(step.Text);
            if (step.StopReason != "eos") tokens++;
            if (step.StopReason is not null) stop = step.StopReason;
        }
        int promptTokens = _tokenizer.EncodeToIds(prompt).Count;
        return new GenerationResult(text.ToString(), tokens, Math.Max(promptTokens, 1), sw.Elapsed.TotalSeconds, stop, speculation);
    }

    private string Completion(string promptText, List<int> ids)
    {
        string full = _tokenizer.Decode(ids);
        // The prompt decodes to a prefix of the whole; the rest is the completion.
        return full.StartsWith(promptText, StringComparison.Ordinal) ? full[promptText.Length..] : full;
    }
}
