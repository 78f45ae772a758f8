using System.Text.Json.Nodes;

namespace AnyPrecML.Models;

/// <summary>
/// Writes a checkpoint as a Hugging Face Llama directory: config.json, safetensors (one file or
/// shards with model.safetensors.index.json) and tokenizer.model. llama2.c checkpoints use Meta's
/// interleaved RoPE pairing, so their q and k rows are permuted to Hugging Face's half-split
/// pairing on the way (the same permutation as transformers' convert_llama_weights_to_hf).
/// </summary>
public static class HuggingFaceExport
{
    /// <summary>Writes <paramref name="source"/> to <paramref name="outputDirectory"/> (complete or not at all).</summary>
    /// <param name="source">The opened checkpoint.</param>
    /// <param name="outputDirectory">Directory to create; replaced only with <paramref name="overwrite"/>.</param>
    /// <param name="dtype">F32, F16 or BF16.</param>
    /// <param name="tokenizerPath">tokenizer.model to copy in (a llama2.c tokenizer.bin is converted to one), or null for the one found beside the source.</param>
    /// <param name="maxShardBytes">Split into shards of at most this many bytes (0: one file).</param>
    /// <param name="overwrite">Replace an existing non-empty directory.</param>
    /// <param name="progress">Receives the bytes written after each tensor.</param>
    public static void Write(LlamaCheckpoint source, string outputDirectory, DType dtype = DType.F32, string? tokenizerPath = null, long maxShardBytes = 0, bool overwrite = false,
        IProgress<WriteProgress>? progress = null)
    {
        if (dtype is not (DType.F32 or DType.F16 or DType.BF16)) throw new ArgumentException($"dtype must be F32, F16 or BF16, not {dtype.Name()}.", nameof(dtype));
        var c = source.Config;
        tokenizerPath ??= source.TokenizerPath;

        var tensors = new List<TensorToWrite>();
        void Add(string name, Func<float[]> data, long[] shape) =>
            tensors.Add(new TensorToWrite(name, dtype, shape, s => TensorEncoding.WriteFloats(s, data(), dtype)));
        Add(LlamaTensorNames.Embedding, () => source[LlamaTensorNames.Embedding].ToFloatArray(), [c.VocabSize, c.Dim]);
        for (int l = 0; l < c.Layers; l++)
        {
            foreach (var part in new[] { "input_layernorm" }.Concat(LlamaTensorNames.BlockLinears.Take(4)).Append("post_attention_layernorm").Concat(LlamaTensorNames.BlockLinears.Skip(4)))
            {
                string name = LlamaTensorNames.Layer(l, part);
                int heads = part switch { "self_attn.q_proj" => c.Heads, "self_attn.k_proj" => c.KvHeads, _ => 0 };
                bool permute = heads > 0 && c.RopeLayout == RopeLayout.Interleaved;
                Add(name, () => permute ? InterleavedToHalfSplit(source[name].ToFloatArray(), heads, c.HeadDim, c.Dim) : source[name].ToFloatArray(),
                    LlamaTensorNames.ShapeOf(c, part));
            }
        }
        Add(LlamaTensorNames.FinalNorm, () => source[LlamaTensorNames.FinalNorm].ToFloatArray(), [c.Dim]);
        if (!c.TiedEmbeddings) Add(LlamaTensorNames.Head, () => source[LlamaTensorNames.Head].ToFloatArray(), [c.VocabSize, c.Dim]);

        AtomicFile.WriteDirectory(outputDirectory, overwrite, dir =>
        {
            var shards = new List<List<TensorToWrite>> { new() };
            long size = 0;
            foreach (var t in SafetensorsWriter.Reporting(tensors, progress))
            {
                if (maxShardBytes > 0 && size > 0 && size + t.ByteLength > maxShardBytes) { shards.Add([]); size = 0; }
                shards[^1].Add(t);
                size += t.ByteLength;
            }
            var meta = new Dictionary<string, string> { ["format"] = "pt" };
            if (shards.Count == 1) SafetensorsWriter.Write(Path.Combine(dir, "model.safetensors"), shards[0], meta);
            else
            {
                var map = new JsonObject();
                for (int i = 0; i < shards.Count; i++)
                {
                    string file = $"model-{i + 1:D5}-of-{shards.Count:D5}.safetensors";
                    SafetensorsWriter.Write(Path.Combine(dir, file), shards[i], meta);
                    foreach (var t in shards[i]) map[t.Name] = file;
                }
                var index = new JsonObject { ["metadata"] = new JsonObject { ["total_size"] = tensors.Sum(t => t.ByteLength) }, ["weight_map"] = map };
                AtomicFile.WriteText(Path.Combine(dir, "model.safetensors.index.json"), index.ToJsonString(new() { WriteIndented = true }));
            }
            AtomicFile.WriteText(Path.Combine(dir, "config.json"), ConfigJson(c, dtype).ToJsonString(new() { WriteIndented = true }));
            if (tokenizerPath is not null) Llama2cTokenizerFile.CopyAsSentencePieceModel(tokenizerPath, Path.Combine(dir, "tokenizer.model"));
        });
    }

    /// <summary>The Hugging Face config.json of <paramref name="c"/>.</summary>
    public static JsonObject ConfigJson(LlamaConfig c, DType dtype) => new()
    {
        ["architectures"] = new JsonArray("LlamaForCausalLM"),
        ["model_type"] = "llama",
        ["hidden_size"] = c.Dim,
        ["intermediate_size"] = c.HiddenDim,
        ["num_hidden_layers"] = c.Layers,
        ["num_attention_heads"] = c.Heads,
        ["num_key_value_heads"] = c.KvHeads,
        ["head_dim"] = c.HeadDim,
        ["vocab_size"] = c.VocabSize,
        ["max_position_embeddings"] = c.MaxSeqLen,
        ["rms_norm_eps"] = c.RmsNormEps,
        ["rope_theta"] = c.RopeTheta,
        ["tie_word_embeddings"] = c.TiedEmbeddings,
        ["bos_token_id"] = c.BosTokenId,
        ["eos_token_id"] = c.EosTokenId,
        ["hidden_act"] = "silu",
        ["torch_dtype"] = dtype switch { DType.F16 => "float16", DType.BF16 => "bfloat16", _ => "float32" },
    };

    /// <summary>
    /// Reorders the rows of a q or k projection [heads*headDim, cols] from interleaved RoPE pairs
    /// (2i, 2i+1) to half-split pairs (i, i+headDim/2): within each head, row 2i+j moves to j*headDim/2+i.
    /// </summary>
    public static float[] InterleavedToHalfSplit(float[] w, int heads, int headDim, int cols)
    {
        var r = new float[w.Length];
        int half = headDim / 2;
        for (int h = 0; h < heads; h++)
            for (int i = 0; i < half; i++)
                for (int j = 0; j < 2; j++)
                    Array.Copy(w, ((long)h * headDim + 2 * i + j) * cols, r, ((long)h * headDim + j * half + i) * cols, cols);
        return r;
    }
}
