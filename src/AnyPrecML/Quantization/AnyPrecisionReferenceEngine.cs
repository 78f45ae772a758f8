using System.Collections.Concurrent;
using AnyPrecML.Models;
using AnyPrecML.Reference;

namespace AnyPrecML.Quantization;

/// <summary>
/// The reference engine over an any-precision model: each width runs the fp32 reference forward pass on that width's
/// dequantized weights, dequantized on first use and kept. Every width shares one cache type, so a draft and a target
/// can run through it like through <see cref="Onnx.OnnxEngine"/>. Being the oracle it holds fp32 weights per width
/// used; the ONNX engine is the one that serves every width from the bitplanes alone.
/// </summary>
public sealed class AnyPrecisionReferenceEngine : IAnyPrecisionEngine
{
    private readonly AnyPrecisionModel _model;
    private readonly ConcurrentDictionary<int, ReferenceEngine> _widths = new();
    private readonly ConcurrentDictionary<string, ReferenceEngine> _profiles = new(StringComparer.Ordinal);
    private int _bits;

    /// <summary>An engine over <paramref name="model"/> (kept open by the caller) running at <paramref name="bits"/> (default: the parent width).</summary>
    public AnyPrecisionReferenceEngine(AnyPrecisionModel model, int? bits = null)
    {
        _model = model ?? throw new ArgumentNullException(nameof(model));
        _bits = model.CheckBits(bits ?? model.ParentBits);
    }

    /// <inheritdoc/>
    public LlamaConfig Config => _model.Config;
    /// <inheritdoc/>
    public int SeedBits => _model.SeedBits;
    /// <inheritdoc/>
    public int ParentBits => _model.ParentBits;

    /// <inheritdoc/>
    public string Kernels => "managed fp32 on dequantized weights";

    /// <summary>Width used by <see cref="Forward(ReadOnlySpan{int}, KvCache, Span{float})"/>; validated against seed..n.</summary>
    public int Bits
    {
        get => _bits;
        set => _bits = _model.CheckBits(value);
    }

    /// <summary>The reference engine of width <paramref name="bits"/>.</summary>
    public ReferenceEngine AtWidth(int bits) => _widths.GetOrAdd(_model.CheckBits(bits), b => new ReferenceEngine(_model.ToWeights(b)));

    /// <inheritdoc/>
    public KvCache CreateCache(int capacity = 0) => AtWidth(_bits).CreateCache(capacity);

    /// <inheritdoc/>
    public void Forward(ReadOnlySpan<int> tokens, KvCache cache, Span<float> logits) => Forward(tokens, cache, logits, _bits);

    /// <inheritdoc/>
    public void Forward(ReadOnlySpan<int> tokens, KvCache cache, Span<float> logits, int bits) => AtWidth(bits).Forward(tokens, cache, logits);

    /// <inheritdoc/>
    public void Forward(ReadOnlySpan<int> tokens, KvCache cache, Span<float> logits, IReadOnlyList<int> widths)
    {
        ArgumentNullException.ThrowIfNull(widths);
        string key = string.Join(',', widths);
        _profiles.GetOrAdd(key, _ => new ReferenceEngine(_model.ToWeights(new PrecisionProfile(_model, widths)))).Forward(tokens, cache, logits);
    }

    /// <summary>Nothing to release (the model is the caller's).</summary>
    public void Dispose() { }
}
