using System.Buffers.Binary;
using System.Text;
using AnyPrecML.Models;
using AnyPrecML.Reference;

namespace AnyPrecML.Tests;

[TestClass]
public sealed class CheckpointTests
{
    private static readonly int[] Probe = [1, 403, 407, 261, 378, 13, 300, 42, 7, 511, 256, 3];

    [TestMethod]
    public void Bf16WidensToTheSameBitsAtEveryPatternAndLength()
    {
        // Every bf16 bit pattern (NaNs, infinities, subnormals, both zeros), and lengths around the vector width for the tail.
        using var dir = TestData.NewTempDir();
        int[] lengths = [1, 7, 15, 16, 17, 31, 33, 65536 + 37];
        var values = lengths.Select(n => Enumerable.Range(0, n).Select(i => (ushort)(n > 65536 ? i : i * 40503 + n)).ToArray()).ToArray();
        string path = dir["bf16.safetensors"];
        SafetensorsWriter.Write(path, lengths.Select((n, k) => new TensorToWrite($"t{k}", DType.BF16, [n],
            s => s.Write(System.Runtime.InteropServices.MemoryMarshal.AsBytes(values[k].AsSpan())))).ToList());
        var (file, tensors, _) = SafetensorsReader.Open(path);
        using (file)
            for (int k = 0; k < lengths.Length; k++)
            {
                var widened = tensors.Single(t => t.Name == $"t{k}").ToFloatArray();
                for (int i = 0; i < lengths[k]; i++)
                    Assert.AreEqual((uint)values[k][i] << 16, BitConverter.SingleToUInt32Bits(widened[i]), $"length {lengths[k]}, element {i}");
            }
    }

    [TestMethod]
    public void Stories260KHeaderIsRead()
    {
        using var cp = LlamaCheckpoint.Open(TestData.Stories260K);
        var c = cp.Config;
        Assert.AreEqual((64, 172, 5, 8, 4, 512, 512), (c.Dim, c.HiddenDim, c.Layers, c.Heads, c.KvHeads, c.VocabSize, c.MaxSeqLen));
        Assert.IsTrue(c.TiedEmbeddings);
        Assert.AreEqual(RopeLayout.Interleaved, c.RopeLayout);
        Assert.AreEqual(CheckpointFormat.Llama2c, cp.Format);
        Assert.AreEqual("tok512.model", Path.GetFileName(cp.TokenizerPath));
        Assert.AreEqual(2 + 5 * 9, cp.TensorNames.Count);
    }

    [TestMethod]
    [DataRow("f32", 1e-5)]
    [DataRow("f16", 5e-2)]
    [DataRow("bf16", 2e-1)]
    public void ConvertedHuggingFaceDirectoryGivesTheSameLogits(string dtype, double tolerance)
    {
        using var dir = TestData.NewTempDir();
        using var source = LlamaCheckpoint.Open(TestData.Stories260K);
        var dt = dtype switch { "f16" => DType.F16, "bf16" => DType.BF16, _ => DType.F32 };
        HuggingFaceExport.Write(source, dir["hf"], dt);
        using var converted = LlamaCheckpoint.Open(dir["hf"]);

        Assert.AreEqual(CheckpointFormat.HuggingFace, converted.Format);
        Assert.AreEqual(RopeLayout.HalfSplit, converted.Config.RopeLayout);
        Assert.IsTrue(File.Exists(dir["hf/tokenizer.model"]));
        Assert.AreEqual(dt, converted[LlamaTensorNames.Layer(0, "self_attn.q_proj")].DType);
        var expected = TestData.AllLogits(ReferenceEngine.FromCheckpoint(source), Probe);
        var actual = TestData.AllLogits(ReferenceEngine.FromCheckpoint(converted), Probe);
        Assert.IsLessThan(tolerance, TestData.MaxAbsDiff(expected, actual));
    }

    [TestMethod]
    public void ShardedDirectoryWithIndexLoads()
    {
        using var dir = TestData.NewTempDir();
        using var source = LlamaCheckpoint.Open(TestData.Stories260K);
        HuggingFaceExport.Write(source, dir["hf"], DType.F32, maxShardBytes: 300_000);
        Assert.IsTrue(File.Exists(dir["hf/model.safetensors.index.json"]));
        Assert.IsGreaterThan(2, Directory.GetFiles(dir["hf"], "model-*-of-*.safetensors").Length);
        using var sharded = LlamaCheckpoint.Open(dir["hf"]);
        Assert.IsLessThan(1e-5, TestData.MaxAbsDiff(
            TestData.AllLogits(ReferenceEngine.FromCheckpoint(source), Probe),
            TestData.AllLogits(ReferenceEngine.FromCheckpoint(sharded), Probe)));
    }

    [TestMethod]
    public void UntiedGqaHuggingFaceModelRoundTrips()
    {
        using var dir = TestData.NewTempDir();
        var w = TestData.RandomWeights(TestData.TinyConfig(tied: false), seed: 11);
        WriteHuggingFace(w, dir["m"]);
        using var cp = LlamaCheckpoint.Open(dir["m"]);
        Assert.IsFalse(cp.Config.TiedEmbeddings);
        Assert.AreEqual(2, cp.Config.KvHeads);
        int[] tokens = [1, 2, 3, 4, 5, 36];
        Assert.IsLessThan(1e-6, TestData.MaxAbsDiff(TestData.AllLogits(new ReferenceEngine(w), tokens), TestData.AllLogits(ReferenceEngine.FromCheckpoint(cp), tokens)));
    }

    [TestMethod]
    public void Llama2cVersion1HeaderGivesTheSameModel()
    {
        using var dir = TestData.NewTempDir();
        using var v0 = LlamaCheckpoint.Open(TestData.Stories260K);
        WriteLlama2cVersion1(v0, dir["v1.bin"]);
        using var v1 = LlamaCheckpoint.Open(dir["v1.bin"]);
        Assert.AreEqual(v0.Config, v1.Config with { });
        Assert.AreEqual(0.0, TestData.MaxAbsDiff(TestData.AllLogits(ReferenceEngine.FromCheckpoint(v0), Probe), TestData.AllLogits(ReferenceEngine.FromCheckpoint(v1), Probe)));
    }

    // ------------------------------------------------------------------ bad input

    [TestMethod]
    public void TruncatedLlama2cFileIsRejected()
    {
        using var dir = TestData.NewTempDir();
        var bytes = File.ReadAllBytes(TestData.Stories260K);
        File.WriteAllBytes(dir["cut.bin"], bytes[..(bytes.Length - 1000)]);
        var e = Assert.ThrowsExactly<ModelFormatException>(() => LlamaCheckpoint.Open(dir["cut.bin"]));
        StringAssert.Contains(e.Message, "truncated");
        File.WriteAllBytes(dir["tiny.bin"], bytes[..20]);
        StringAssert.Contains(Assert.ThrowsExactly<ModelFormatException>(() => LlamaCheckpoint.Open(dir["tiny.bin"])).Message, "truncated");
        File.WriteAllBytes(dir["empty.bin"], []);
        StringAssert.Contains(Assert.ThrowsExactly<ModelFormatException>(() => LlamaCheckpoint.Open(dir["empty.bin"])).Message, "empty");
    }

    [TestMethod]
    public void HostileLlama2cHeaderIsRejectedWithoutAllocating()
    {
        using var dir = TestData.NewTempDir();
        var bytes = File.ReadAllBytes(TestData.Stories260K);
        BinaryPrimitives.WriteInt32LittleEndian(bytes.AsSpan(0), 4096);    // dim
        BinaryPrimitives.WriteInt32LittleEndian(bytes.AsSpan(8), 1000);    // layers
        File.WriteAllBytes(dir["big.bin"], bytes);
        StringAssert.Contains(Assert.ThrowsExactly<ModelFormatException>(() => LlamaCheckpoint.Open(dir["big.bin"])).Message, "truncated");
        BinaryPrimitives.WriteInt32LittleEndian(bytes.AsSpan(0), -5);
        File.WriteAllBytes(dir["neg.bin"], bytes);
        StringAssert.Contains(Assert.ThrowsExactly<ModelFormatException>(() => LlamaCheckpoint.Open(dir["neg.bin"])).Message, "dim");
        BinaryPrimitives.WriteInt32LittleEndian(bytes.AsSpan(0), 0x616b3432);
        BinaryPrimitives.WriteInt32LittleEndian(bytes.AsSpan(4), 2);
        File.WriteAllBytes(dir["v2.bin"], bytes);
        StringAssert.Contains(Assert.ThrowsExactly<ModelFormatException>(() => LlamaCheckpoint.Open(dir["v2.bin"])).Message, "version 2");
    }

    [TestMethod]
    public void MissingModelIsAFileNotFound() =>
        Assert.ThrowsExactly<FileNotFoundException>(() => LlamaCheckpoint.Open("/no/such/model.bin"));

    /// <summary>Writes a safetensors file by hand from a header string and a data length (independent of the writer).</summary>
    private static void RawSafetensors(string path, string header, int dataBytes, long? declaredHeaderLength = null)
    {
        var h = Encoding.UTF8.GetBytes(header);
        var bytes = new byte[8 + h.Length + dataBytes];
        BinaryPrimitives.WriteUInt64LittleEndian(bytes, (ulong)(declaredHeaderLength ?? h.Length));
        h.CopyTo(bytes, 8);
        File.WriteAllBytes(path, bytes);
    }

    [TestMethod]
    [DataRow("""{"a":{"dtype":"F32","shape":[2,2],"data_offsets":[0,16]}}""", 16, null, null)]
    [DataRow("""{"a":{"dtype":"F32","shape":[2,2],"data_offsets":[0,16]}}""", 8, null, "outside")]
    [DataRow("""{"a":{"dtype":"F32","shape":[2,3],"data_offsets":[0,16]}}""", 16, null, "span")]
    [DataRow("""{"a":{"dtype":"F32","shape":[2,2],"data_offsets":[8,4]}}""", 16, null, "outside")]
    [DataRow("""{"a":{"dtype":"Q4","shape":[2,2],"data_offsets":[0,16]}}""", 16, null, "unknown dtype")]
    [DataRow("""{"a":{"dtype":"F32","shape":[4611686018427387904,4],"data_offsets":[0,16]}}""", 16, null, "overflow")]
    [DataRow("""{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}}""", 16, null, "overlap")]
    [DataRow("""{"a":{"dtype":"F32","shape":[2,2],"data_offsets":[0,16]}""", 16, null, "JSON")]
    [DataRow("""{"a":{"dtype":"F32","shape":[2,2],"data_offsets":[0,16]}}""", 16, 1L << 40, "header length")]
    public void SafetensorsHeaderIsChecked(string header, int dataBytes, long? declaredHeaderLength, string? error)
    {
        using var dir = TestData.NewTempDir();
        RawSafetensors(dir["t.safetensors"], header, dataBytes, declaredHeaderLength);
        if (error is null)
        {
            var (file, tensors, _) = SafetensorsReader.Open(dir["t.safetensors"]);
            using (file)
            {
                Assert.HasCount(1, tensors);
                Assert.AreEqual(16, tensors[0].Bytes.Length);
            }
            return;
        }
        var e = Assert.ThrowsExactly<ModelFormatException>(() => SafetensorsReader.Open(dir["t.safetensors"]));
        StringAssert.Contains(e.Message, error);
        StringAssert.Contains(e.Message, "t.safetensors");
    }

    [TestMethod]
    public void UnknownArchitectureIsNamed()
    {
        using var dir = TestData.NewTempDir();
        WriteHuggingFace(TestData.RandomWeights(TestData.TinyConfig(), 1), dir["m"]);
        string cfg = dir["m/config.json"];
        File.WriteAllText(cfg, File.ReadAllText(cfg).Replace("LlamaForCausalLM", "GPT2LMHeadModel"));
        var e = Assert.ThrowsExactly<ModelFormatException>(() => LlamaCheckpoint.Open(dir["m"]));
        StringAssert.Contains(e.Message, "GPT2LMHeadModel");
    }

    [TestMethod]
    public void MissingOrMisshapenTensorIsNamed()
    {
        using var dir = TestData.NewTempDir();
        var w = TestData.RandomWeights(TestData.TinyConfig(), 1);
        WriteHuggingFace(w, dir["m"], drop: LlamaTensorNames.Layer(1, "mlp.up_proj"));
        StringAssert.Contains(Assert.ThrowsExactly<ModelFormatException>(() => LlamaCheckpoint.Open(dir["m"])).Message, "model.layers.1.mlp.up_proj.weight");
        WriteHuggingFace(w, dir["n"]);
        File.WriteAllText(dir["n/config.json"], File.ReadAllText(dir["n/config.json"]).Replace("\"intermediate_size\": 48", "\"intermediate_size\": 50"));
        StringAssert.Contains(Assert.ThrowsExactly<ModelFormatException>(() => LlamaCheckpoint.Open(dir["n"])).Message, "expected [50, 32]");
    }

    // ------------------------------------------------------------------ writers used by the tests

    internal static void WriteHuggingFace(LlamaWeights w, string dir, string? drop = null)
    {
        var c = w.Config;
        Directory.CreateDirectory(dir);
        var tensors = new List<TensorToWrite> { TensorToWrite.FromFloats(LlamaTensorNames.Embedding, w.Embedding, [c.VocabSize, c.Dim]) };
        for (int l = 0; l < c.Layers; l++)
        {
            var b = w.Blocks[l];
            tensors.Add(TensorToWrite.FromFloats(LlamaTensorNames.Layer(l, "input_layernorm"), b.AttentionNorm, [c.Dim]));
            tensors.Add(TensorToWrite.FromFloats(LlamaTensorNames.Layer(l, "post_attention_layernorm"), b.FfnNorm, [c.Dim]));
            foreach (var part in LlamaTensorNames.BlockLinears)
                tensors.Add(TensorToWrite.FromFloats(LlamaTensorNames.Layer(l, part), b.Linear(part), LlamaTensorNames.ShapeOf(c, part)));
        }
        tensors.Add(TensorToWrite.FromFloats(LlamaTensorNames.FinalNorm, w.FinalNorm, [c.Dim]));
        if (!c.TiedEmbeddings) tensors.Add(TensorToWrite.FromFloats(LlamaTensorNames.Head, w.Head, [c.VocabSize, c.Dim]));
        SafetensorsWriter.Write(Path.Combine(dir, "model.safetensors"), tensors.Where(t => t.Name != drop).ToList());
        File.WriteAllText(Path.Combine(dir, "config.json"), HuggingFaceExport.ConfigJson(c, DType.F32).ToJsonString(new() { WriteIndented = true }));
    }

    /// <summary>llama2.c's version-1 layout (export.py version1_export): 256-byte header, norms first, then the matrices.</summary>
    private static void WriteLlama2cVersion1(LlamaCheckpoint cp, string path)
    {
        var c = cp.Config;
        using var f = File.Create(path);
        var header = new byte[256];
        BinaryPrimitives.WriteUInt32LittleEndian(header, 0x616b3432);
        BinaryPrimitives.WriteInt32LittleEndian(header.AsSpan(4), 1);
        int[] p = [c.Dim, c.HiddenDim, c.Layers, c.Heads, c.KvHeads, c.VocabSize, c.MaxSeqLen];
        for (int i = 0; i < 7; i++) BinaryPrimitives.WriteInt32LittleEndian(header.AsSpan(8 + 4 * i), p[i]);
        header[36] = (byte)(c.TiedEmbeddings ? 1 : 0);
        f.Write(header);
        void W(string name) => f.Write(cp[name].Bytes);
        void Layers(string part) { for (int l = 0; l < c.Layers; l++) W(LlamaTensorNames.Layer(l, part)); }
        Layers("input_layernorm"); Layers("post_attention_layernorm"); W(LlamaTensorNames.FinalNorm); W(LlamaTensorNames.Embedding);
        Layers("self_attn.q_proj"); Layers("self_attn.k_proj"); Layers("self_attn.v_proj"); Layers("self_attn.o_proj");
        Layers("mlp.gate_proj"); Layers("mlp.down_proj"); Layers("mlp.up_proj");
        if (!c.TiedEmbeddings) W(LlamaTensorNames.Head);
    }
}
