using System.Text.Json.Nodes;

namespace AnyPrecML.Models;

/// <summary>
/// Models in real shapes with random weights, for speed and memory benchmarks (speed does not
/// depend on the values; quality is measured on real models only).
/// </summary>
public static class SyntheticModel
{
    /// <summary>Known shapes by name.</summary>
    public static readonly IReadOnlyDictionary<string, LlamaConfig> Shapes = new Dictionary<string, LlamaConfig>
    {
        // llama2.c's stories models share the classifier with the embedding.
        ["stories15M"] = Shape(288, 768, 6, 6, 6, 32000, 256) with { TiedEmbeddings = true },
        ["stories110M"] = Shape(768, 2048, 12, 12, 12, 32000, 1024) with { TiedEmbeddings = true },
        ["tinyllama-1.1b"] = Shape(2048, 5632, 22, 32, 4, 32000, 2048),
        ["llama2-7b"] = Shape(4096, 11008, 32, 32, 32, 32000, 4096),
    };

    private static LlamaConfig Shape(int dim, int hidden, int layers, int heads, int kv, int vocab, int ctx) => new()
    {
        Dim = dim, HiddenDim = hidden, Layers = layers, Heads = heads, KvHeads = kv, HeadDim = dim / heads,
        VocabSize = vocab, MaxSeqLen = ctx, RmsNormEps = 1e-5f, RopeTheta = 10000f, RopeLayout = RopeLayout.HalfSplit,
    };

    /// <summary>The shape called <paramref name="name"/>; throws naming the known ones otherwise.</summary>
    public static LlamaConfig ShapeNamed(string name) => Shapes.TryGetValue(name, out var c) ? c
        : throw new ArgumentException($"unknown shape '{name}'; known: {string.Join(", ", Shapes.Keys)}.", nameof(name));

    /// <summary>
    /// Writes a Hugging Face directory of shape <paramref name="config"/> with weights ~ N(0, 0.02²)
    /// (an Irwin–Hall approximation) and unit norms, one tensor in memory at a time.
    /// </summary>
    public static void Write(LlamaConfig config, string directory, DType dtype, string? tokenizerPath = null, ulong seed = 1, bool overwrite = false,
        IProgress<WriteProgress>? progress = null)
    {
        var c = config.Validated("synthetic shape");
        var tensors = new List<TensorToWrite>();
        ulong index = 0;
        void Random(string name, params long[] shape)
        {
            ulong s = seed ^ (++index * 0x9E3779B97F4A7C15);
            tensors.Add(new TensorToWrite(name, dtype, shape, stream =>
            {
                long n = TensorView.CheckedElementCount(shape)!.Value;
                const int Chunk = 1 << 20;
                var buffer = new float[Chunk];
                ulong state = s | 1;
                for (long done = 0; done < n; done += Chunk)
                {
                    int m = (int)Math.Min(Chunk, n - done);
                    for (int i = 0; i < m; i++)
                    {
                        // Sum of four uniforms: mean 0, variance 4/12; scaled to sd 0.02.
                        float sum = 0;
                        for (int k = 0; k < 4; k++) { state ^= state << 13; state ^= state >> 7; state ^= state << 17; sum += (state >> 40) * (1f / (1 << 24)); }
                        buffer[i] = (sum - 2f) * 0.0346f;
                    }
                    TensorEncoding.WriteFloats(stream, buffer.AsSpan(0, m), dtype);
                }
            }));
        }
        void Ones(string name, int n) => tensors.Add(TensorToWrite.FromFloats(name, Enumerable.Repeat(1f, n).ToArray(), [n], dtype));

        Random(LlamaTensorNames.Embedding, c.VocabSize, c.Dim);
        for (int l = 0; l < c.Layers; l++)
        {
            Ones(LlamaTensorNames.Layer(l, "input_layernorm"), c.Dim);
            Ones(LlamaTensorNames.Layer(l, "post_attention_layernorm"), c.Dim);
            foreach (var part in LlamaTensorNames.BlockLinears) Random(LlamaTensorNames.Layer(l, part), LlamaTensorNames.ShapeOf(c, part));
        }
        Ones(LlamaTensorNames.FinalNorm, c.Dim);
        if (!c.TiedEmbeddings) Random(LlamaTensorNames.Head, c.VocabSize, c.Dim);

        AtomicFile.WriteDirectory(directory, overwrite, dir =>
        {
            SafetensorsWriter.Write(Path.Combine(dir, "model.safetensors"), SafetensorsWriter.Reporting(tensors, progress), new Dictionary<string, string> { ["format"] = "pt", ["synthetic"] = "true" });
            JsonObject cfg = HuggingFaceExport.ConfigJson(c, dtype);
            AtomicFile.WriteText(Path.Combine(dir, "config.json"), cfg.ToJsonString(new() { WriteIndented = true }));
            if (tokenizerPath is not null) Llama2cTokenizerFile.CopyAsSentencePieceModel(tokenizerPath, Path.Combine(dir, "tokenizer.model"));
        });
    }
}
