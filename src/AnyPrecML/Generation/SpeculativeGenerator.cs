using System.Numerics.Tensors;
using AnyPrecML.Models;

namespace AnyPrecML.Generation;

/// <summary>What a speculative run did: tokens drafted and accepted, and forward passes at each width.</summary>
public sealed class SpeculationStats
{
    /// <summary>Draft width.</summary>
    public int DraftBits { get; init; }
    /// <summary>Target width.</summary>
    public int TargetBits { get; init; }
    /// <summary>Tokens the draft proposed.</summary>
    public long Drafted { get; internal set; }
    /// <summary>Drafted tokens the target kept.</summary>
    public long Accepted { get; internal set; }
    /// <summary>Drafted tokens the target replaced (at most one a round; the drafts after it are never examined).</summary>
    public long Rejected { get; internal set; }
    /// <summary>Verify passes of the target (one per round, over up to k + 1 positions; the prompt's prefill not counted).</summary>
    public long TargetSteps { get; internal set; }
    /// <summary>Forward passes of the draft.</summary>
    public long DraftSteps { get; internal set; }
    /// <summary>
    /// The chance that the target keeps a drafted token it examines: accepted / (accepted + rejected), independent of k
    /// for a given draft and target (0 before any draft). Accepted / <see cref="Drafted"/> is lower, as drafts after a
    /// rejection are thrown away unexamined.
    /// </summary>
    public double AcceptanceRate => Accepted + Rejected > 0 ? (double)Accepted / (Accepted + Rejected) : 0;
}

/// <summary>
/// Self-speculative decoding of one sequence over one any-precision engine: the draft width proposes up to k tokens one
/// at a time, the target width checks them all in one forward pass over k + 1 positions (the batched path, M = k + 1),
/// and <see cref="Sampler.Verify"/> keeps a prefix of them plus one token of the target's own, so the output is
/// distributed exactly as target-only decoding (greedy: equal to it, token for token). Both widths run on the same
/// engine and weights, each with its own KV cache; rejected positions are rolled back with <see cref="KvCache.Truncate"/>.
/// </summary>
/// <remarks>
/// Invariant between rounds, with S the committed tokens (prompt and output): the target cache holds S without its last
/// token; the draft cache holds a prefix of that (it catches up in its first forward of the next round).
/// </remarks>
public sealed class SpeculativeGenerator
{
    private readonly IAnyPrecisionEngine _engine;
    private readonly Sampler _sampler;
    private readonly int _draftBits, _targetBits, _k, _vocab;
    private readonly float _threshold;
    private readonly List<int> _ids;
    private readonly int[] _drafted;
    private readonly float[] _draftLogits, _draftProbs, _targetLogits, _targetProbs, _residual;

    /// <summary>
    /// Prefills <paramref name="prompt"/> (BOS included) at the target width, ready for <see cref="NextRound"/>. The
    /// draft width is <see cref="GenerationOptions.DraftBits"/>, the target <paramref name="targetBits"/> (default: the
    /// engine's width); caches hold <paramref name="capacity"/> positions (default: the model's context).
    /// </summary>
    public SpeculativeGenerator(IAnyPrecisionEngine engine, IReadOnlyList<int> prompt, GenerationOptions options, Sampler sampler, int? targetBits = null, int capacity = 0)
    {
        _engine = engine ?? throw new ArgumentNullException(nameof(engine));
        _sampler = sampler ?? throw new ArgumentNullException(nameof(sampler));
        ArgumentNullException.ThrowIfNull(prompt);
        options.Validated();
        _targetBits = targetBits ?? engine.Bits;
        _draftBits = options.DraftBits ?? throw new ArgumentException("speculative decoding needs a draft width (DraftBits).", nameof(options));
        if (_targetBits < engine.SeedBits || _targetBits > engine.ParentBits)
            throw new ArgumentOutOfRangeException(nameof(targetBits), _targetBits, $"this model serves {engine.SeedBits}..{engine.ParentBits} bits.");
        if (_draftBits < engine.SeedBits || _draftBits >= _targetBits)
            throw new ArgumentOutOfRangeException(nameof(options), _draftBits, $"the draft width must be in {engine.SeedBits}..{_targetBits - 1} (below the target's {_targetBits} bits).");
        if (prompt.Count == 0) throw new ArgumentException("the prompt must hold at least BOS.", nameof(prompt));
        _k = options.DraftTokens;
        _threshold = options.DraftThreshold;
        _vocab = engine.Config.VocabSize;
        _ids = [.. prompt];
        _drafted = new int[_k];
        _draftLogits = new float[_vocab];
        _draftProbs = new float[_k * _vocab];
        _targetLogits = new float[(_k + 1) * _vocab];
        _targetProbs = new float[_vocab];
        _residual = new float[_vocab];
        DraftCache = engine.CreateCache(capacity);
        TargetCache = engine.CreateCache(capacity);
        if (_ids.Count >= TargetCache.Capacity) throw new ArgumentException($"the prompt has {_ids.Count} tokens; the cache holds {TargetCache.Capacity}.", nameof(prompt));
        Stats = new SpeculationStats { DraftBits = _draftBits, TargetBits = _targetBits };
        if (_ids.Count > 1) engine.Forward(_ids.ToArray().AsSpan(0, _ids.Count - 1), TargetCache, _targetLogits.AsSpan(0, _vocab), _targetBits);
    }

    /// <summary>The draft width's cache.</summary>
    public KvCache DraftCache { get; }
    /// <summary>The target width's cache: the committed tokens but the last.</summary>
    public KvCache TargetCache { get; }
    /// <summary>Counts so far.</summary>
    public SpeculationStats Stats { get; }
    /// <summary>The committed tokens: the prompt, then every token emitted.</summary>
    public IReadOnlyList<int> Tokens => _ids;

    /// <summary>
    /// One round: drafts up to k tokens, verifies them in one target pass, and returns the tokens it commits (the
    /// accepted drafts, then the target's correction or bonus token): 1 to k + 1 of them.
    /// </summary>
    /// <exception cref="InvalidOperationException">The cache has no room for another token.</exception>
    public IReadOnlyList<int> NextRound()
    {
        int length = _ids.Count, vocab = _vocab;
        // The verify pass appends k + 1 positions to the target's length - 1.
        int room = TargetCache.Capacity - length;
        if (room < 0) throw new InvalidOperationException($"context full: the cache holds {TargetCache.Capacity} positions.");
        bool greedy = _sampler.IsGreedy;

        // Draft: one token per forward at the draft width; its first forward also feeds what the cache lacks.
        int drafted = 0, fed = 0, limit = Math.Min(_k, room);
        while (drafted < limit)
        {
            int from = DraftCache.Length, to = length + drafted;
            var feed = new int[to - from];
            for (int p = from; p < to; p++) feed[p - from] = p < length ? _ids[p] : _drafted[p - length];
            _engine.Forward(feed, DraftCache, _draftLogits, _draftBits);
            Stats.DraftSteps++;
            fed = drafted;
            var probs = _draftProbs.AsSpan(drafted * vocab, vocab);
            float top;
            if (greedy) top = TopProbability(_draftLogits);
            else { _sampler.Distribution(_draftLogits, probs); top = TensorPrimitives.Max(probs); }
            // Adaptive length: stop once the draft is unsure (it keeps at least one token a round).
            if (drafted > 0 && top < _threshold) break;
            _drafted[drafted++] = greedy ? TensorPrimitives.IndexOfMax(_draftLogits) : _sampler.Draw(probs);
        }

        // Verify: the last committed token and the drafts in one target pass, logits at every position.
        var verify = new int[drafted + 1];
        verify[0] = _ids[length - 1];
        _drafted.AsSpan(0, drafted).CopyTo(verify.AsSpan(1));
        var logits = _targetLogits.AsSpan(0, (drafted + 1) * vocab);
        _engine.Forward(verify, TargetCache, logits, _targetBits);
        Stats.TargetSteps++;
        Stats.Drafted += drafted;

        var emitted = new List<int>(drafted + 1);
        int accepted = 0;
        for (; accepted < drafted; accepted++)
        {
            var row = logits.Slice(accepted * vocab, vocab);
            ReadOnlySpan<float> target = row;
            if (!greedy) { _sampler.Distribution(row, _targetProbs); target = _targetProbs; }
            var (ok, token) = _sampler.Verify(_draftProbs.AsSpan(accepted * vocab, vocab), target, _drafted[accepted], _residual);
            emitted.Add(token);
            if (!ok) break;
        }
        // Every draft kept: the target's next token comes free from the last position.
        if (accepted == drafted) emitted.Add(_sampler.Next(logits.Slice(drafted * vocab, vocab)));
        else Stats.Rejected++;
        Stats.Accepted += accepted;

        // Roll back: the target keeps the committed tokens but the new last; the draft keeps what agrees with them.
        TargetCache.Truncate(length + accepted);
        DraftCache.Truncate(Math.Min(DraftCache.Length, length + Math.Min(fed, accepted)));
        _ids.AddRange(emitted);
        return emitted;
    }

    /// <summary>The first <paramref name="count"/> greedy tokens after <paramref name="prompt"/>, drafted at <paramref name="draftBits"/> and verified at <paramref name="targetBits"/>, k at a time; and the run's counts.</summary>
    public static (int[] Tokens, SpeculationStats Stats) Greedy(IAnyPrecisionEngine engine, int draftBits, int targetBits, int k, int[] prompt, int count)
    {
        var options = new GenerationOptions { DraftBits = draftBits, DraftTokens = k };
        var generator = new SpeculativeGenerator(engine, prompt, options, new Sampler(options), targetBits, Math.Min(engine.Config.MaxSeqLen, prompt.Length + count + k));
        while (generator.Tokens.Count < prompt.Length + count) generator.NextRound();
        return (generator.Tokens.Skip(prompt.Length).Take(count).ToArray(), generator.Stats);
    }

    /// <summary>What speculative decoding is measured against: the first <paramref name="count"/> greedy tokens at <paramref name="bits"/>, one forward pass each.</summary>
    public static int[] TargetOnlyGreedy(IAnyPrecisionEngine engine, int bits, int[] prompt, int count)
    {
        var cache = engine.CreateCache(Math.Min(engine.Config.MaxSeqLen, prompt.Length + count));
        var logits = new float[engine.Config.VocabSize];
        // As TextGenerator's target-only decoding: the last prompt token as a decode step, as a verification pass feeds it.
        if (prompt.Length > 1) engine.Forward(prompt.AsSpan(0, prompt.Length - 1), cache, new float[engine.Config.VocabSize], bits);
        engine.Forward(prompt.AsSpan(prompt.Length - 1), cache, logits, bits);
        var output = new int[count];
        for (int i = 0; i < count; i++)
        {
            output[i] = TensorPrimitives.IndexOfMax(logits);
            if (i + 1 < count) engine.Forward([output[i]], cache, logits, bits);
        }
        return output;
    }

    /// <summary>The largest softmax probability of <paramref name="logits"/>: 1 / Σ exp(l − max).</summary>
    private static float TopProbability(ReadOnlySpan<float> logits)
    {
        float max = TensorPrimitives.Max(logits), sum = 0;
        foreach (float l in logits) sum += MathF.Exp(l - max);
        return 1f / sum;
    }
}
